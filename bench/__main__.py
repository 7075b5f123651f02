"""``python -m pdserve.bench``: the serving benchmark's command line."""

from __future__ import annotations

import sys

from pdserve.bench.cli import main

sys.exit(main())
