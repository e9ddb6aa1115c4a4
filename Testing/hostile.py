"""Shared pieces of the hostile-input tests (``Testing/*/test_hostile_*.py``): the hypothesis
settings, the hang guard, and the check that an error is one clear line naming the file.

Each hostile case ends in a correct result or in an MTKDError whose message names the file and
the problem: never another exception, never a hang. Example-based tests of the same areas:
test_data_io (a truncated file, random bytes, 2-D/4-D/vector images, NaN voxels, zero
spacing, label grids), test_bundle.test_code_in_weights_is_refused_and_not_run,
test_bundle.test_unsafe_zip_members_are_refused_before_writing,
test_bundle.test_tampered_weights_are_refused,
test_library.test_zip_escaping_its_folder_is_refused_and_writes_nothing,
test_library.test_tampered_weights_are_refused and
test_engine_loop.test_init_from_a_missing_or_tampered_model_is_refused.
"""

from __future__ import annotations

import faulthandler
import math
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, settings

from mtkd.data.image_io import MAX_VOXELS, SPACING_RANGE_MM
from mtkd.errors import MTKDError

# Reproducible in CI (the same examples on every run), bounded, no per-example deadline (the
# no_hang guard below catches hangs), no example database written into the source tree.
HOSTILE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HANG_SECONDS = 60


class Hang(BaseException):
    """Raised into a call that ran past its time (a BaseException: no ``except Exception``
    in the code under test can swallow it)."""


@contextmanager
def no_hang(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Fail instead of hanging: after ``seconds`` SIGALRM raises :class:`Hang` into Python
    code; a hang inside C code (ITK, zlib, torch) ends the process with every thread's stack
    dumped (faulthandler) after twice that, so CI fails instead of blocking."""
    faulthandler.dump_traceback_later(2 * seconds + 5, exit=True, file=sys.__stderr__)
    previous = None
    if hasattr(signal, "setitimer"):

        def expire(signum, frame):
            raise Hang(f"no result after {seconds} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def attempt(call: Callable[[], object]) -> object:
    """``call()``'s result or the MTKDError it raised; any other exception fails the test."""
    with no_hang():
        try:
            return call()
        except MTKDError as error:
            return error


def assert_clear(error: object, path: Path, *words: str) -> None:
    """``error`` is an MTKDError on one line that names ``path``'s file and a problem."""
    assert isinstance(error, MTKDError), f"expected an MTKDError, got {error!r}"
    message = str(error)
    assert "\n" not in message.strip(), message
    assert path.name in message, message
    assert error.problem.strip(), message
    for word in words:
        assert word.lower() in message.lower(), message


def scratch(base: Path):
    """A fresh folder for one example, removed after it."""
    return tempfile.TemporaryDirectory(dir=base)


# --- a valid original: a tiny rotated volume ---------------------------------------------------

SHAPE = (6, 5, 4)  # numpy (z, y, x): 4x5x6 voxels
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-10.0, 20.5, 30.25)
_C, _S = math.cos(0.5), math.sin(0.5)
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)


def reference_image() -> sitk.Image:
    """A tiny int16 volume (values 0..1399: a CT and a label map alike) with a rotated
    direction and non-trivial geometry."""
    values = (np.arange(np.prod(SHAPE)).reshape(SHAPE) * 37 % 1400).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def assert_sane(image: sitk.Image, label: bool) -> None:
    """What every image a reader returns must satisfy, whatever the file held."""
    assert image.GetDimension() == 3 and min(image.GetSize()) >= 2
    assert math.prod(image.GetSize()) <= MAX_VOXELS
    spacing = np.array(image.GetSpacing())
    assert np.all(np.isfinite(spacing)), spacing
    assert np.all(spacing >= SPACING_RANGE_MM[0]) and np.all(spacing <= SPACING_RANGE_MM[1])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.all(np.isfinite(direction)) and abs(np.linalg.det(direction)) > 1e-6
    assert np.all(np.isfinite(image.GetOrigin()))
    assert image.GetNumberOfComponentsPerPixel() == 1
    if label:
        assert image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16)
    else:
        assert image.GetPixelID() == sitk.sitkFloat32
        assert np.all(np.isfinite(sitk.GetArrayViewFromImage(image)))


def assert_one_line_error(code: int, error: str, path: Path, *words: str) -> None:
    """The CLI exited 2 with one line ``mtkd: error: PATH: problem`` naming ``path``."""
    assert code == 2, (code, error)
    assert "Traceback" not in error, error
    lines = error.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtkd: error:"), error
    assert str(path) in lines[0], error
    for word in words:
        assert word.lower() in lines[0].lower(), error
