"""`python -m cluster serve CONFIG` (the entry point `ray job submit` runs)."""

import sys

from cluster.cli import main

sys.exit(main())
