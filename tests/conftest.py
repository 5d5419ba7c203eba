import sys
from pathlib import Path

# The plain-PyTorch reference lives beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
