"""`python -m pdserve.cluster serve CONFIG` (the entry point `ray job submit` runs)."""

import sys

from pdserve.cluster.cli import main

sys.exit(main())
