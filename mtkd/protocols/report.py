"""A protocol's report: every finished stage's model scored on the test patients of the
split they share (:func:`mtkd.infer.scoring.score_model`): per-volume Dice and HD95 per
structure and the paper's pooled slice Dice (:mod:`mtkd.infer.pooled`), written to
``RUNS/report.json`` and ``RUNS/report.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtkd.data.atomic import atomic_write_bytes
from mtkd.data.splits import read_split
from mtkd.errors import MTKDError
from mtkd.metrics import format_missed
from mtkd.protocols.specification import Protocol, Stage
from mtkd.run_folder import FINISHED, RunDir

if TYPE_CHECKING:
    from mtkd.infer.scoring import ModelScores

__all__ = ["evaluate_protocol", "format_report", "write_report"]


def _shared_split(protocol: Protocol, runs: Path, finished: list[Stage]) -> dict[str, list]:
    """The split every finished stage used (they must agree: the same patients)."""
    split, first = None, None
    for stage in finished:
        path = RunDir(runs / stage.name).split
        if not path.is_file():
            raise MTKDError("run folder without split.json", path.parent)
        current = read_split(path).to_dict()
        if split is None:
            split, first = current, stage.name
            continue
        for part in ("train", "val", "test"):
            if sorted(current[part]) != sorted(split[part]):
                raise MTKDError(
                    f"stages '{first}' and '{stage.name}' used different {part} patients; "
                    "a protocol's stages must share one split",
                    path,
                )
    return split or {}


def _clean(value: Any) -> Any:
    """JSON-safe: NaN -> null, infinities -> "inf"/"-inf"."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _mean(values: list[float]) -> float:
    from mtkd.metrics import nanmean

    return nanmean(list(values))


def evaluate_protocol(
    protocol: Protocol, runs: str | Path, *, device: str = "auto", log=print
) -> dict[str, Any]:
    """Evaluate every finished stage's model on the test patients of the shared split."""
    from mtkd.data.datasets import load_dataset
    from mtkd.devices import resolve_device
    from mtkd.infer.scoring import score_model
    from mtkd.modelfiles.model_io import load_model

    runs = Path(runs)
    finished = [s for s in protocol.stages if RunDir(runs / s.name).state == FINISHED]
    if not finished:
        raise MTKDError(f"no finished stage of protocol '{protocol.name}' to evaluate", runs)
    split = _shared_split(protocol, runs, finished)
    test = list(split.get("test", []))
    if not test:
        raise MTKDError("the split has no test patients to evaluate on", runs)
    config = finished[0].config
    dataset = load_dataset(config.data.source, labels_json=config.data.labels_json)
    torch_device = resolve_device(device)
    models: dict[str, Any] = {}
    for stage in finished:
        log(f"[{protocol.name}] evaluating {stage.name} on {len(test)} test case(s)")
        model = load_model(runs / stage.name, torch_device)
        scored = score_model(model, dataset, test, torch_device, with_slices=True)
        models[stage.name] = _model_entry(stage, runs, model.metadata, scored)
    teacher = next((models[s.name] for s in finished if not s.is_student), None)
    for stage in finished:
        entry = models[stage.name]
        if teacher is not None and stage.is_student:
            ours, theirs = entry["summary"]["mean"]["dice"], teacher["summary"]["mean"]["dice"]
            entry["teacher_dice_kept"] = ours / theirs if theirs and theirs > 0 else math.nan
    return _clean(
        {
            "protocol": protocol.name,
            "description": protocol.description,
            "data": config.data.source,
            "runs": str(runs.resolve()),
            "dims": protocol.dims,
            "structures": list(
                dataset.labels.names if not config.data.structures else config.data.structures
            ),
            "split": split,
            "models": models,
            "reference": protocol.reference,
        }
    )


def _model_entry(
    stage: Stage, runs: Path, metadata: dict[str, Any], scored: ModelScores
) -> dict[str, Any]:
    """One stage's row of the report: its model and its scores on the test patients."""
    result = scored.slices
    pooled, per_slice = result.pooled(), result.mean_slice()
    pooled["mean"] = _mean(list(pooled.values()))
    per_slice["mean"] = _mean(list(per_slice.values()))
    run_split = read_split(RunDir(runs / stage.name).split)
    trained_on = (
        run_split.student_train if stage.config.train_on == "student_train" else run_split.train
    )
    return {
        "run": str((runs / stage.name).resolve()),
        "kind": stage.config.kind,
        "network": stage.config.model.name,
        "parameters": metadata.get("parameters"),
        "distilled": bool(metadata.get("lineage", {}).get("distilled", False)),
        "baseline_of": stage.baseline_of,
        "train_cases": sorted(trained_on),
        "best_val_dice": metadata.get("metrics", {}).get("best_val_dice"),
        "summary": scored.summary,
        "pooled_slice_dice": pooled,
        "mean_slice_dice": per_slice,
        "test_slices": result.counts.slices,
        "seconds_per_volume": _mean(result.seconds),
        "per_volume": [
            {
                "case": s.case_id,
                "structure": s.structure,
                "dice": s.dice,
                "hd95_mm": s.hd95_mm,
                "outcome": s.outcome,
            }
            for s in scored.scores
        ],
    }


def _score(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"


def _missed(mean: dict[str, Any]) -> str:
    if "missed" not in mean:  # a report written before the count existed
        return "n/a"
    return format_missed(int(mean["missed"]), int(mean.get("spurious") or 0))


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown: one row per model."""
    split = report.get("split", {})
    reference = report.get("reference") or {}
    structures = report["structures"]
    lines = [
        f"# Protocol {report['protocol']}",
        "",
        f"Data: `{report['data']}`; runs: `{report['runs']}`.",
        f"Patients (split by patient): train {len(split.get('train', []))} (students "
        f"{len(split.get('student_train', []))}), validation {len(split.get('val', []))} (from "
        f"the training patients), test {len(split.get('test', []))}: "
        f"{', '.join(split.get('test', []))}.",
        "",
        "Dice and HD95 per volume on each CT's grid, mean over the test volumes; pooled slice "
        "Dice: overlaps summed over every test slice (the paper's metric); mean slice Dice: "
        "per-slice Dice averaged over the slices holding the structure. A structure a model "
        "leaves empty in a test volume (missed: how many) counts in HD95 as the CT's diagonal "
        "in mm, as does one labelled where the reference has none (spurious).",
        "",
    ]
    header = ["model", "network", "params", "KD", "train cases"]
    header += [f"Dice {name}" for name in structures] if len(structures) > 1 else []
    header += ["mean Dice", "mean HD95 mm", "missed", "pooled slice Dice", "mean slice Dice"]
    header += ["teacher Dice kept", "s/volume"]
    if reference:
        header.append("paper")
    rows = []
    for name, model in report["models"].items():
        summary = model["summary"]
        kd = "-" if model["kind"] == "train" else ("yes" if model["distilled"] else "no")
        row = [
            name,
            model["network"],
            f"{model['parameters']:,}" if isinstance(model["parameters"], int) else "n/a",
            kd,
            str(len(model["train_cases"])),
        ]
        if len(structures) > 1:
            row += [_score(summary.get(s, {}).get("dice")) for s in structures]
        row += [
            _score(summary["mean"]["dice"]),
            _score(summary["mean"]["hd95_mm"]),
            _missed(summary["mean"]),
            _score(model["pooled_slice_dice"]["mean"]),
            _score(model["mean_slice_dice"]["mean"]),
            _score(model.get("teacher_dice_kept")) if model["kind"] == "distill" else "-",
            _score(model["seconds_per_volume"]),
        ]
        if reference:
            row.append(_score(reference.get(name)))
        rows.append(row)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if reference.get("metric"):
        lines += ["", f"paper: {reference['metric']}."]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], runs: str | Path) -> None:
    """``report`` as ``RUNS/report.json`` and ``RUNS/report.md``."""
    runs = Path(runs)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write_bytes(runs / "report.json", text.encode())
    atomic_write_bytes(runs / "report.md", format_report(report).encode())
