"""The one error type the engine raises for problems a user can fix."""

from __future__ import annotations

from pathlib import Path


class MTKDError(ValueError):
    """A problem with the user's input, configuration or files.

    The message names the problem and, where there is one, the file:
    ``MTKDError("image has NaN voxels", path="ct.nii.gz")`` reads
    ``ct.nii.gz: image has NaN voxels``.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.problem = message
        super().__init__(message if path is None else f"{path}: {message}")


def error_summary(error: BaseException) -> str:
    """``TypeName first line of the message`` of a third-party exception, for our messages."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__} {lines[0]}" if lines else type(error).__name__


def one_line(text: str, limit: int = 400) -> str:
    """``text`` with its whitespace (newlines, tabs) collapsed to single spaces, cut to
    ``limit`` characters: a multi-line library message made fit for a one-line error."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
