"""`python -m wgates` (so that torchrun and friends can launch the CLI)."""

import sys

from wgates.cli import main

sys.exit(main())
