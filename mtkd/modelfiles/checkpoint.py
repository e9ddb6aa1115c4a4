"""Checkpoints: written atomically, loaded safely, never silently replaced by a fresh start."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mtkd.data.image_io import atomic_path
from mtkd.errors import MTKDError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` through a synced temporary file and an atomic rename.

    A crash at any moment leaves either the previous checkpoint or the new one, never a
    partial file. A full disk or a read-only folder raises MTKDError; the old file stays.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            torch.save(state, temporary)
    except OSError as error:
        raise MTKDError(f"cannot write checkpoint ({error.strerror or error})", path=path) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code in a pickle ever runs)."""
    path = Path(path)
    if not path.is_file():
        raise MTKDError("checkpoint not found", path=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (  # what torch raises for a cut, garbled or code-carrying file
        RuntimeError,
        EOFError,
        OSError,
        ValueError,  # UnicodeDecodeError included
        zipfile.BadZipFile,
        pickle.UnpicklingError,
    ) as error:
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise MTKDError(
            f"checkpoint is corrupt or not a weights-only file ({first_line})", path
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise MTKDError("not an MTKD checkpoint", path=path)
    return state
