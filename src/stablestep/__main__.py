"""``python -m stablestep``: the same command line as ``stablestep``."""

import sys

from stablestep.cli import main

sys.exit(main())
