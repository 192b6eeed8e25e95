"""``python -m mdmt.results.dashboard``: the same as ``mdmt dashboard``."""

import sys

from mdmt.results.dashboard.cli import main

sys.exit(main())
