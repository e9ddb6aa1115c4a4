"""``python -m mtkd.cli``, the same as ``python -m mtkd``."""

import sys

from mtkd.cli import main

sys.exit(main())
