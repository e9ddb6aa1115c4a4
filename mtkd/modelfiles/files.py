"""File names and checksums of a model folder: what can be read without torch (the model
library and the Slicer panel list models before any engine dependency is installed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS = "model.pt"
METADATA = "mtkd_model.json"
FORMAT_VERSION = 1


RUN_MODEL = "model"
"""The folder in which a run keeps its exported model (``RUN/model``, :mod:`mtkd.run_folder`)."""


def model_folder(path: Path) -> Path:
    """``path``, or ``path/model`` when ``path`` is a run folder holding its exported model
    (and no model of its own)."""
    if not (path / METADATA).is_file() and (path / RUN_MODEL / METADATA).is_file():
        return path / RUN_MODEL
    return path


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
