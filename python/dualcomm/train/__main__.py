import sys

from dualcomm.train.cli import main

sys.exit(main())
