"""The result record of each run of a grid (and of the teacher): test scores, training
record and validation Dice, cached as JSON next to the run while its weights and the test
cases are the same."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtkd.ablation.grid import NO_OUTPUT, TEACHER, Ablation, Cell
from mtkd.data.datasets import DatasetIndex
from mtkd.errors import MTKDError
from mtkd.infer.scoring import score_model
from mtkd.metrics import MISSED
from mtkd.modelfiles.model_io import LoadedModel, load_model
from mtkd.run_folder import RunDir, read_events

__all__ = ["RESULT_FILE", "RESULT_FORMAT", "run_history", "run_result", "teacher_result"]

# 2: HD95 with the missed-structure penalty, missed/spurious counts; 3: per-case scores,
# split seed, validation Dice
RESULT_FORMAT = 3
RESULT_FILE = "ablation_result.json"  # in each run's report/


def _score(
    model: LoadedModel, dataset: DatasetIndex, test: list[str], device, csv_path: Path
) -> dict[str, Any]:
    """Per-volume Dice and HD95 on ``test``, averaged over volumes then structures, how many
    structure-volumes were missed (or spurious) and scored the penalty HD95, and the scores of
    every case and structure (``cases``)."""
    scored = score_model(model, dataset, test, device, scores_csv=csv_path)
    summary = dict(scored.summary)
    mean = summary.pop("mean")
    return {
        "dice": mean["dice"],
        "hd95_mm": mean["hd95_mm"],
        "missed": mean["missed"],
        "spurious": mean["spurious"],
        "per_structure": summary,
        "cases": [
            {
                "case": s.case_id,
                "structure": s.structure,
                "dice": s.dice,
                "hd95": s.hd95_mm,
                "missed": int(s.outcome == MISSED),
            }
            for s in scored.scores
        ],
    }


def _cached(path: Path, sha256: str | None, test: list[str]) -> dict[str, Any] | None:
    """The record cached at ``path`` when it is of this format, weights and test cases."""
    if sha256 is None or not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    valid = (
        cached.get("format") == RESULT_FORMAT
        and cached.get("weights_sha256") == sha256
        and cached.get("test_cases") == test
    )
    return cached if valid else None


def run_result(
    ablation: Ablation,
    cell: Cell,
    split_seed: tuple[int, int],
    run_dir: Path,
    relative: str,
    dataset: DatasetIndex,
    test: list[str],
    device,
) -> dict[str, Any]:
    """The run's test scores and training record (from its cache while its weights are the
    same). ``split_seed``: (split seed, seed)."""
    split, seed = split_seed
    folder = RunDir(run_dir)
    run_test = json.loads(folder.split.read_text()).get("test")
    if run_test != test:
        raise MTKDError(
            f"this run's test cases ({run_test}) are not the grid's ({test})", path=run_dir
        )
    metadata = json.loads(folder.model_metadata.read_text())
    sha256 = metadata.get("weights_sha256")
    cache = folder.report / RESULT_FILE
    cached = _cached(cache, sha256, test)
    if cached is not None:
        return cached
    model = load_model(folder.root, device)
    scores = _score(model, dataset, test, device, folder.report / "test_scores.csv")
    metrics = metadata.get("metrics") or {}
    history = run_history(folder)
    result = {
        "format": RESULT_FORMAT,
        "cell": cell.name,
        "method": cell.family,
        "role": cell.role,
        "split_seed": split,
        "seed": seed,
        "pairs": list(cell.pairs),
        "feature_loss": cell.feature_loss or "",
        "output_loss": cell.output_loss or ("" if cell.is_no_kd else NO_OUTPUT),
        "parameters": metadata.get("parameters"),
        **scores,
        "best_val_dice": metrics.get("best_val_dice"),
        "val_dice": _best_val_dice(history, metrics.get("best_val_dice")),
        "best_epoch": metrics.get("best_epoch"),
        "epochs": ablation.base.train.epochs,
        "train_seconds": round(sum(float(r.get("seconds", 0.0)) for r in history), 3),
        "run": relative,
        "weights_sha256": sha256,
        "test_cases": test,
    }
    folder.write_json(cache, result)
    return result


def teacher_result(
    teacher: str,
    folder: Path,
    dataset: DatasetIndex,
    test: list[str],
    device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The teacher's row: its test scores (cached in ``folder``/result.json)."""
    from mtkd.modelfiles.sources import is_stored_output, load_any_model

    if is_stored_output(teacher):
        raise MTKDError(
            "the teacher row needs a teacher model, and these are stored outputs; remove "
            "'teacher' from ablation.include",
            path=teacher,
        )
    model = load_any_model(teacher, device)
    sha256 = model.metadata.get("weights_sha256")
    cache = folder / "result.json"
    cached = _cached(cache, sha256, test)
    if cached is not None:
        return cached
    _warn_teacher_overlap(Path(teacher), test, log)
    log(f"teacher: scoring {teacher} on the {len(test)} test case(s)")
    scores = _score(model, dataset, test, device, folder / "test_scores.csv")
    metrics = model.metadata.get("metrics") or {}
    parameters = model.metadata.get("parameters")
    if parameters is None and hasattr(model.network, "parameters"):
        parameters = sum(p.numel() for p in model.network.parameters())
    result = {
        "format": RESULT_FORMAT,
        "cell": TEACHER,
        "role": TEACHER,
        "seed": None,
        "pairs": [],
        "feature_loss": "",
        "output_loss": "",
        "parameters": parameters,
        **scores,
        "best_val_dice": metrics.get("best_val_dice"),
        "best_epoch": metrics.get("best_epoch"),
        "epochs": None,
        "train_seconds": None,
        "run": str(teacher),
        "weights_sha256": sha256,
        "test_cases": test,
    }
    RunDir(folder).write_json(cache, result)
    return result


def _warn_teacher_overlap(teacher: Path, test: list[str], log: Callable[[str], None]) -> None:
    """Warn when the teacher's own run trained or validated on the grid's test cases."""
    for split_file in (RunDir(teacher).split, RunDir(teacher.parent).split):  # run, model/
        if split_file.is_file():
            try:
                split = json.loads(split_file.read_text())
            except (OSError, json.JSONDecodeError):
                return
            seen = set(split.get("train", [])) | set(split.get("val", []))
            overlap = sorted(seen & set(test))
            if overlap:
                log(
                    f"warning: the teacher trained or validated on test case(s) "
                    f"{', '.join(overlap)} (its split.json); its row and the distilled students "
                    "are scored on cases the teacher has seen"
                )
            return


def _best_val_dice(history: list[dict[str, Any]], fallback: Any) -> float | None:
    """The run's best validation Dice over its epochs' events (``fallback``, the model's
    metadata, when no epoch was validated)."""
    values = [r.get("val_dice") for r in history]
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if values:
        return max(values)
    return float(fallback) if isinstance(fallback, (int, float)) else None


def run_history(folder: RunDir) -> list[dict[str, Any]]:
    """The run's per-epoch records (report/history.json, else the metrics events)."""
    path = folder.report / "history.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    by_epoch = {e["epoch"]: e for e in read_events(folder.events) if e.get("type") == "metrics"}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]
