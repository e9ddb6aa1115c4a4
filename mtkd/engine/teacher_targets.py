"""Teacher targets computed once per training image (``distill.teacher_targets``).

When the output term is the only distillation term that weighs, all a training step needs of
the teacher is its logits for the student's input. ``online`` runs the frozen teacher on every
batch. ``precomputed`` runs it once over each training image before the first epoch, on the
whole preprocessed volume (axial slices in 2-D, sliding windows of the student's patch size in
3-D, as ``mtkd segment`` does), and keeps the logits with the cached case (float16,
(C, X, Y, Z), C the student's output channels, 2 bytes a channel and voxel); the batches then
carry them cropped, sliced and flipped together with the image, as stored teacher outputs
travel (:mod:`mtkd.data.loading`). ``auto`` precomputes where it can.

The targets are the same function of the same teacher, with two differences from ``online``:
the teacher sees the whole volume (its test-time context) rather than the student's patch, and
the image before the intensity augmentations that the student's input gets. Feature-level
terms compare both networks' features of the same input and stay online.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from mtkd.config import DistillConfig
from mtkd.data.labels import LabelTable
from mtkd.data.loading import VolumeCache
from mtkd.data.preprocess import Preprocessing
from mtkd.distill.presets import feature_weights, resolve_output_term
from mtkd.engine.teacher_source import TeacherSource, teacher_transform
from mtkd.errors import MTKDError
from mtkd.infer.inference import KEEP_LOGITS, predict_volume

__all__ = ["ONLINE", "PRECOMPUTED", "precompute_teacher_logits", "teacher_targets"]

ONLINE, PRECOMPUTED, AUTO = "online", "precomputed", "auto"


def teacher_targets(distill: DistillConfig | None, stored_teacher: bool) -> str:
    """:data:`ONLINE` or :data:`PRECOMPUTED` for a run's ``distill`` section (None: no
    distillation). Stored teacher outputs are maps already, and a recipe where no term weighs
    (the no-KD baseline) needs no teacher pass: both online. MTKDError when ``precomputed`` is
    asked of a recipe whose feature terms weigh."""
    if distill is None or stored_teacher or distill.teacher_targets == ONLINE:
        return ONLINE
    output = resolve_output_term(distill)
    features = [label for label, weight in feature_weights(distill).items() if weight > 0]
    if features and distill.teacher_targets == PRECOMPUTED:
        raise MTKDError(
            "distill.teacher_targets: precomputed needs a recipe whose output term alone "
            f"weighs; its feature terms ({', '.join(features)}) need the teacher's features of "
            "each batch (set teacher_targets to online or auto)"
        )
    if features or output is None or output.weight <= 0:
        return ONLINE
    return PRECOMPUTED


def precompute_teacher_logits(
    source: TeacherSource,
    cache: VolumeCache,
    case_ids: list[str],
    prep: Preprocessing,
    labels: LabelTable,
    activation: str,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> None:
    """Attach the teacher network's logits of the student's structures, as the distiller's
    output term compares them, to each case of ``case_ids`` in ``cache``: (C, X, Y, Z) on the
    case's preprocessed grid (raw logits when the teacher has the student's labels and
    activation, else the name-matched pseudo-logits). ``prep``: the student's preprocessing."""
    model = source.model
    if model is None:
        raise ValueError("precomputed teacher targets need a teacher network")
    # the student's input, as the teacher gets it online: the student's preprocessing with
    # the teacher's input channels
    prep = replace(prep, in_channels=model.prep.in_channels)
    transform = teacher_transform(model, labels, activation)
    started, kept = time.perf_counter(), 0
    for case_id in case_ids:
        image = cache[case_id].image  # (1, X, Y, Z)
        logits = predict_volume(model.network, image, prep, KEEP_LOGITS, device, amp=False)
        if transform is not None:
            logits = transform(logits[None])[0]
        cache.attach_teacher_logits(case_id, logits)
        kept += cache[case_id].teacher.nbytes
    seconds = time.perf_counter() - started
    log(
        f"teacher targets: the teacher's logits of {len(case_ids)} images computed once "
        f"({seconds:.1f} s, {kept / 2**20:.0f} MiB kept in memory)"
    )
