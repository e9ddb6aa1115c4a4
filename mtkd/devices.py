"""Devices and seeding: the one rule for what a device string is, turning one into a torch
device, mixed precision on it, and seeding every random generator a run uses.

A device name is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (N = 0, 1, ... in ASCII digits) or
``mps``. :func:`check_device_name` applies that rule without torch (the Slicer modules and the
configuration use it); :func:`resolve_device` also checks that this machine has the device.
torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from mtkd.errors import MTKDError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?|mps", re.ASCII)
ACCEPTED = "auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"


def is_device_name(name: object) -> bool:
    """Whether ``name`` is a device name by the rule above (says nothing of this machine)."""
    return isinstance(name, str) and DEVICE_PATTERN.fullmatch(name) is not None


def check_device_name(name: object, path: str | Path | None = None, key: str | None = None) -> str:
    """``name`` when it is a device name; MTKDError naming ``key`` (a config key) and ``path``
    (its file) otherwise."""
    if is_device_name(name):
        return name  # type: ignore[return-value]
    where = f"config key '{key}': " if key else ""
    raise MTKDError(f"{where}unknown device {_shown(name)}: use {ACCEPTED}", path=path)


def _shown(name: object) -> str:
    text = repr(name) if isinstance(name, str) else f"{name!r} ({type(name).__name__})"
    return text if len(text) <= 60 else text[:57] + "..."


def resolve_device(name: str) -> torch.device:
    """ "auto" -> CUDA when available, else the CPU; "cpu", "cuda", "cuda:N", "mps" as named.
    A device this machine does not have (or a name outside the rule) is an MTKDError."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise MTKDError(f"device '{name}' requested but MPS (Apple GPU) is not available")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise MTKDError(f"device '{name}' requested but CUDA is not available")
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise MTKDError(
            f"device '{name}' requested but this machine has {count} GPU(s)"
            f" (cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", index) if ":" in name else torch.device("cuda")


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 (fp16 where bf16 is unsupported) autocast on CUDA; a no-op context on the CPU."""
    import contextlib

    import torch

    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators from ``seed``."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
