"""A run's distillation teacher, opened and checked against the run's data.

The teacher is a network or another tool's stored outputs (:mod:`mtkd.engine.teacher_source`,
which loads it frozen). It must segment every student structure (by name) in the student's
dimensions and at the student's spacing; a different HU window is only warned about.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtkd.config import RunConfig
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.engine.teacher_source import (
    TeacherSource,
    check_feature_terms,
    resolve_teacher,
    teacher_transform,
)
from mtkd.errors import MTKDError
from mtkd.modelfiles.model_io import LoadedModel

__all__ = ["check_teacher", "open_teacher", "rounded_spacing"]


def rounded_spacing(spacing: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """Spacing rounded to 1 µm for comparison (None keeps each image's own spacing)."""
    return None if spacing is None else tuple(round(float(s), 3) for s in spacing)


def open_teacher(
    config: RunConfig,
    labels: LabelTable,
    activation: str,
    prep: Preprocessing,
    device: torch.device,
    log: Callable[[str], None],
) -> TeacherSource | None:
    """The distillation teacher, checked against this run (None for a training run)."""
    distill = config.distill
    if config.kind != "distill" or distill is None:
        return None
    source = resolve_teacher(distill.teacher, labels, device, labels_json=config.data.labels_json)
    check_feature_terms(source, distill)
    if source.model is not None:
        check_teacher(source.model, labels, activation, prep, log)
    return source


def check_teacher(
    teacher: LoadedModel,
    labels: LabelTable,
    activation: str,
    prep: Preprocessing,
    log: Callable[[str], None],
) -> None:
    """The teacher must segment every student structure (by name) in the student's dims."""
    teacher_transform(teacher, labels, activation)  # MTKDError if one is missing
    if teacher.prep.dims != prep.dims:
        raise MTKDError(
            f"teacher is {teacher.prep.dims}-D, the student {prep.dims}-D", teacher.folder
        )
    if rounded_spacing(teacher.prep.spacing) != rounded_spacing(prep.spacing):
        raise MTKDError(
            f"the teacher works at spacing {teacher.prep.spacing} mm, this run's data.spacing "
            f"is {prep.spacing}: the teacher would see the wrong scale; set data.spacing "
            "to the teacher's",
            path=teacher.folder,
        )
    if tuple(teacher.prep.hu_window) != tuple(prep.hu_window):
        log(
            f"warning: the teacher was trained with HU window {list(teacher.prep.hu_window)}, "
            f"this run uses {list(prep.hu_window)}; the teacher sees this run's input "
            "(set data.hu_window to the teacher's to match it)"
        )
