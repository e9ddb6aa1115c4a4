"""File names and checksums of a model folder: what can be read without torch (the model
library and the Slicer panel list models before any engine dependency is installed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS = "model.pt"
METADATA = "mtkd_model.json"
FORMAT_VERSION = 1


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
