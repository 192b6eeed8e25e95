"""``python -m shared.dashboard``: the same as ``mdmt dashboard``."""

import sys

from shared.dashboard.cli import main

sys.exit(main())
