"""``python -m mtkd`` (and ``PythonSlicer -m mtkd`` inside Slicer)."""

import sys

from mtkd.cli import main

sys.exit(main())
