"""Validation of a run's student during training: per-volume Dice on the validation cases
(a structure a case does not annotate has no score there)."""

from __future__ import annotations

import math
from typing import Any

import torch

from mtkd.engine.distributed import Distributed
from mtkd.engine.setup_data import RunData
from mtkd.infer.inference import predict_volume, probabilities_to_labels
from mtkd.metrics import dice_per_structure, nanmean

__all__ = ["validation_scores"]


def validation_scores(
    network: torch.nn.Module,
    data: RunData,
    device: torch.device,
    *,
    amp: bool,
    dist: Distributed,
) -> dict[str, Any]:
    """Per-volume Dice on the validation cases (preprocessed grid): the mean ``val_dice`` and
    ``val_dice_per_structure`` (each structure's mean over the volumes). Under torchrun each
    process scores its share of the cases and every process gets all the scores."""
    names = list(data.labels.names)
    mine = []
    for case_id in data.split.val[dist.rank :: dist.world_size]:
        case = data.cache[case_id]
        probabilities = predict_volume(
            network, case.image, data.prep, data.activation, device, amp=amp
        )
        prediction = probabilities_to_labels(probabilities, data.activation).numpy()
        scores = dice_per_structure(prediction, case.label[0].numpy(), len(names))
        known = case.annotated  # (K + 1,) bool; an unannotated structure is not scored
        mine.append(
            [s if known is None or bool(known[i]) else math.nan for i, s in enumerate(scores, 1)]
        )
    per_volume = [scores for shares in dist.gather(mine) for scores in shares]
    per_structure = {
        name: nanmean([scores[i] for scores in per_volume]) for i, name in enumerate(names)
    }
    return {
        "val_dice": nanmean(list(per_structure.values())),
        "val_dice_per_structure": per_structure,
    }
