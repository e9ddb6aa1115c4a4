"""Validation of a run's student during training: per-volume Dice on the validation cases
(a structure a case does not annotate has no score there), and at export the post-processing
chosen on them."""

from __future__ import annotations

import math
from typing import Any

import torch

from mtkd.engine.distributed import Distributed
from mtkd.engine.setup_data import RunData
from mtkd.infer.inference import predict_volume, probabilities_to_labels
from mtkd.infer.postprocess import PostProcessing, StructureRule
from mtkd.metrics import dice_per_structure, nanmean

__all__ = ["largest_part_choice", "validation_scores"]


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
        prediction = _predicted_labels(network, data, case, device, amp)
        mine.append(_case_dice(prediction, case, len(names)))
    per_volume = [scores for shares in dist.gather(mine) for scores in shares]
    per_structure = {
        name: nanmean([scores[i] for scores in per_volume]) for i, name in enumerate(names)
    }
    return {
        "val_dice": nanmean(list(per_structure.values())),
        "val_dice_per_structure": per_structure,
    }


def largest_part_choice(
    network: torch.nn.Module, data: RunData, device: torch.device, *, amp: bool
) -> dict[str, Any] | None:
    """The post-processing a model adopts, chosen on the validation cases (preprocessed grid),
    structure by structure: keep only a structure's largest connected part where that raises
    its mean validation Dice. None without validation cases. Returns ``{"largest_only":
    [names], "chosen_on": "validation", "val_dice_per_structure": {name: {"as_predicted": d,
    "largest_part": d}}}`` (:mod:`mtkd.infer.postprocess` reads it back)."""
    if not data.split.val:
        return None
    names = list(data.labels.names)
    rules = PostProcessing({v: StructureRule(largest_only=True) for v in range(1, len(names) + 1)})
    plain, cleaned = [], []
    for case_id in data.split.val:
        case = data.cache[case_id]
        prediction = _predicted_labels(network, data, case, device, amp)
        plain.append(_case_dice(prediction, case, len(names)))
        cleaned.append(_case_dice(rules.apply(prediction, (1.0, 1.0, 1.0)), case, len(names)))
    per_structure = {
        name: {
            "as_predicted": nanmean([scores[i] for scores in plain]),
            "largest_part": nanmean([scores[i] for scores in cleaned]),
        }
        for i, name in enumerate(names)
    }
    chosen = [n for n, d in per_structure.items() if d["largest_part"] > d["as_predicted"]]
    return {
        "largest_only": chosen,
        "chosen_on": "validation",
        "val_dice_per_structure": per_structure,
    }


def _predicted_labels(network, data: RunData, case, device: torch.device, amp: bool):
    """The network's label map (X, Y, Z) of a cached case, on the preprocessed grid."""
    probabilities = predict_volume(network, case.image, data.prep, data.activation, device, amp=amp)
    return probabilities_to_labels(probabilities, data.activation).numpy()


def _case_dice(prediction, case, count: int) -> list[float]:
    """Dice of structures 1..count against the case's labels; NaN where not annotated."""
    scores = dice_per_structure(prediction, case.label[0].numpy(), count)
    known = case.annotated  # (K + 1,) bool; an unannotated structure is not scored
    return [s if known is None or bool(known[i]) else math.nan for i, s in enumerate(scores, 1)]
