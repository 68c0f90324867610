"""`python -m training.cli` (and `accelerate launch -m training.cli`): the flash-distill entry point."""

import sys

from training.cli.main import main

sys.exit(main())
