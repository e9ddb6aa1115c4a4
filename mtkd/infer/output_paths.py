"""Where ``mtkd segment`` and ``mtkd compare`` write, decided and checked before any work.

An output never replaces one of the command's inputs, however it is spelled (relative or
absolute, ``./`` or ``..`` segments, a symbolic link to the file or to its folder, a hard
link, another letter case on a case-insensitive disk), and never lands inside a folder whose
content is an input (a DICOM series, a folder of masks). Such a command is refused with an
MTKDError naming both files before a model is loaded or anything is written. Planning creates
nothing: folders are made by the atomic write itself (:mod:`mtkd.data.atomic`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from mtkd.errors import MTKDError

__all__ = [
    "DEFAULT_SEGMENT_FORMAT",
    "SEGMENTATION_SUFFIXES",
    "SEGMENT_FORMATS",
    "check_compare_outputs",
    "compare_inputs",
    "refuse_overwriting_inputs",
    "segment_outputs",
    "segmentation_suffix",
]

SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
"""File endings ``mtkd segment`` writes (longest first): Slicer segmentation or label map."""
SEGMENT_FORMATS = tuple(suffix[1:] for suffix in SEGMENTATION_SUFFIXES)
"""The values of ``--format``."""
DEFAULT_SEGMENT_FORMAT = "seg.nrrd"


def segmentation_suffix(path: str | Path) -> str | None:
    """The segmentation ending of ``path`` (lower case, e.g. ``.seg.nrrd``), or None."""
    name = Path(path).name.lower()
    return next((s for s in SEGMENTATION_SUFFIXES if name.endswith(s)), None)


def _real(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file or folder (links and spellings included)."""
    with suppress(OSError):
        if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):
            return True  # hard links; another letter case on a case-insensitive disk
    return _real(a) == _real(b)


def _inside(path: Path, folder: Path) -> bool:
    """True when ``path`` lies in ``folder`` or below it (links and spellings included)."""
    real = Path(_real(path))
    if real.is_relative_to(_real(folder)):
        return True
    return any(parent.exists() and _same_file(parent, folder) for parent in real.parents)


def refuse_overwriting_inputs(
    outputs: Iterable[Path], inputs: Iterable[Path], input_folders: Iterable[Path] = ()
) -> None:
    """Raise MTKDError (naming both) when an output would replace one of ``inputs`` or be
    written inside one of ``input_folders`` (folders whose content is an input)."""
    inputs, input_folders = [Path(p) for p in inputs], [Path(p) for p in input_folders]
    for output in map(Path, outputs):
        for source in inputs:
            if _same_file(output, source):
                raise MTKDError(
                    f"this output would replace the input {source}; choose another output", output
                )
        for folder in input_folders:
            if _inside(output, folder):
                raise MTKDError(
                    f"this output would be written into the input folder {folder}; "
                    "choose an output outside it",
                    output,
                )


def _empty_refused(output: str, what: str) -> None:
    if not str(output).strip():
        raise MTKDError(f"the output (-o) is empty; name {what}")


def _in_folder(images: list[Path], folder: Path, fmt: str) -> list[Path]:
    from mtkd.data.image_io import strip_image_suffix

    seen: dict[str, Path] = {}
    outputs = []
    for image in images:
        stem = strip_image_suffix(image.name or Path(os.path.realpath(image)).name)
        other = seen.setdefault(stem.casefold(), image)
        if other is not image:
            raise MTKDError(
                f"this input and {other} would both be written to {stem}.{fmt}; "
                "segment them into separate folders",
                image,
            )
        outputs.append(folder / f"{stem}.{fmt}")
    return outputs


def segment_outputs(
    images: list[Path],
    output: str,
    fmt: str | None = None,
    model: str | Path | None = None,
) -> list[Path]:
    """One output per image of ``mtkd segment``, checked before any work.

    ``output`` (``-o``) is a file for one image, unless it ends with ``/`` or is a folder;
    several images need a folder (a new name without a file ending is taken as one; a
    file or a name with an image ending is refused), where each output is named after its
    image with the ending ``fmt`` (``--format``, default ``seg.nrrd``). ``fmt`` given with a
    file must agree with the file's ending. No output may replace an image or the model
    file, or lie inside an input DICOM series folder. Nothing is created.
    """
    from mtkd.data.image_io import image_suffix

    _empty_refused(output, "a segmentation file or a folder")
    target = Path(output)
    if fmt is not None and fmt not in SEGMENT_FORMATS:
        raise MTKDError(f"unknown --format {fmt}; use one of {', '.join(SEGMENT_FORMATS)}")
    as_folder = output.endswith(("/", "\\", os.sep)) or target.is_dir()
    if not as_folder and len(images) > 1:
        if target.exists() or segmentation_suffix(target) or image_suffix(target):
            raise MTKDError(
                f"{len(images)} inputs need a folder as the output, not a file; "
                "end the output with / to have it made",
                target,
            )
        as_folder = True  # a new name without a file ending: the folder to make
    if as_folder:
        outputs = _in_folder(images, target, fmt or DEFAULT_SEGMENT_FORMAT)
    else:
        suffix = segmentation_suffix(target)
        if suffix is None:
            raise MTKDError(
                "cannot write a segmentation with this name; end it with one of "
                f"{', '.join(SEGMENTATION_SUFFIXES)}, or with / for a folder",
                target,
            )
        if fmt is not None and f".{fmt}" != suffix:
            raise MTKDError(
                f"--format {fmt} disagrees with this output's ending {suffix}; "
                "give only one of them, or make them agree",
                target,
            )
        outputs = [target]
    sources = list(images) + ([Path(model)] if model is not None and Path(model).exists() else [])
    refuse_overwriting_inputs(outputs, sources, [image for image in images if image.is_dir()])
    return outputs


def check_compare_outputs(
    folder: str | Path,
    outputs: Iterable[Path],
    inputs: Iterable[Path],
    input_folders: Iterable[Path] = (),
) -> None:
    """Check ``mtkd compare``'s output ``folder`` and the files it will hold, before any work:
    the folder is not a file nor an input, and no output replaces an input or lies inside one
    of ``input_folders``. Nothing is created."""
    _empty_refused(str(folder), "a folder")
    folder, inputs = Path(folder), [Path(p) for p in inputs]
    for source in inputs:
        if _same_file(folder, source):
            raise MTKDError(
                f"the output folder is the input {source}; choose another folder", folder
            )
    if folder.exists() and not folder.is_dir():
        raise MTKDError("the output is a file; compare writes a folder: name a folder", folder)
    refuse_overwriting_inputs(outputs, inputs, input_folders)


def compare_inputs(
    image: str | Path,
    teacher: str | Path,
    student: str | Path,
    others: Iterable[str | Path | None] = (),
) -> tuple[list[Path], list[Path]]:
    """The paths ``mtkd compare`` reads (the missing and unset left out), and the folders
    among them whose content is an input: the image's DICOM series, a teacher's or student's
    stored folder of masks (a model folder is not one)."""
    from mtkd.modelfiles.sources import is_stored_output

    given = [Path(p) for p in (image, teacher, student, *others) if p]
    inputs = [path for path in given if os.path.lexists(path)]
    folders = [
        path for path in inputs if path.is_dir() and (path == Path(image) or is_stored_output(path))
    ]
    return inputs, folders
