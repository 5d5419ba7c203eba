import sys
from pathlib import Path

# The plain-PyTorch reference lives beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "stress: long repetition runs (tests/test_faults.py), skipped unless DUALCOMM_STRESS=1"
    )
