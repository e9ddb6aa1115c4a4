"""One model scored on a dataset's test cases: the step ``mtkd protocol``'s report and
``mtkd ablate``'s grid share.

Each case is segmented once; the scores are per-volume Dice and HD95 (mm) per structure
(:mod:`mtkd.infer.evaluate`), optionally with the axial slice counts of the paper's slice
Dice (:mod:`mtkd.infer.pooled`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtkd.data.datasets import DatasetIndex
from mtkd.infer.evaluate import CaseScore, evaluate, summarise, write_scores_csv
from mtkd.infer.pooled import Evaluation, evaluate_with_slices
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import LoadedModel

__all__ = ["ModelScores", "score_model"]


@dataclass
class ModelScores:
    """A model's scores on test cases."""

    scores: list[CaseScore]  # one per (case, structure), in case order
    summary: dict[str, dict[str, float]]  # mtkd.infer.evaluate.summarise(scores)
    slices: Evaluation | None = None  # with the slice counts, when asked for


def score_model(
    model: LoadedModel,
    dataset: DatasetIndex,
    case_ids: list[str],
    device,
    *,
    with_slices: bool = False,
    scores_csv: str | Path | None = None,
) -> ModelScores:
    """Score ``model`` (run on the torch ``device``) on the cases ``case_ids`` of ``dataset``;
    with the axial slice counts when ``with_slices``, and the per-volume scores written to
    ``scores_csv`` when given."""
    predictor = Predictor(model, device)
    slices = None
    if with_slices:
        slices = evaluate_with_slices(predictor, dataset, case_ids)
        scores = slices.scores
    else:
        scores = evaluate(predictor, dataset, case_ids)
    if scores_csv is not None:
        write_scores_csv(scores, scores_csv)
    return ModelScores(scores, summarise(scores), slices)
