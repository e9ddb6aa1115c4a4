"""Machine-readable progress lines for front ends that run ``mtkd`` as a process.

With ``--progress``, ``mtkd segment`` and ``mtkd compare`` print lines such as::

    MTKD-PROGRESS {"fraction": 0.4, "stage": "segmenting abdomen.nii.gz"}

on stdout, between their usual human-readable lines. The Slicer modules read them to drive a
progress bar and a status line; :func:`parse_progress` is the one reader.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TextIO

PREFIX = "MTKD-PROGRESS "


@dataclass(frozen=True)
class ProgressUpdate:
    """How far a job is (0..1) and what it is doing now."""

    fraction: float
    stage: str


class ProgressReporter:
    """Prints progress lines when enabled; does nothing otherwise."""

    def __init__(self, enabled: bool, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream

    def __call__(self, fraction: float, stage: str) -> None:
        if not self.enabled:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        line = PREFIX + json.dumps({"fraction": round(fraction, 4), "stage": stage})
        print(line, file=self.stream or sys.stdout, flush=True)


def parse_progress(line: str) -> ProgressUpdate | None:
    """The update a progress line holds; None for any other line (or a garbled one)."""
    if not line.startswith(PREFIX):
        return None
    try:
        data = json.loads(line[len(PREFIX) :])
        return ProgressUpdate(float(data["fraction"]), str(data["stage"]))
    except (ValueError, KeyError, TypeError):
        return None
