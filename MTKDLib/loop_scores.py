"""Versions of the annotate-then-distill loop scored on the same cases, and the gate that
keeps a worse one from becoming current (no Qt; torch loads lazily, in :func:`score_versions`).

Each model is segmented once on the loop's test cases with the engine's scoring
(:func:`mtkd.infer.scoring.score_model`); the per-volume scores are summarised per group of
cases (all test cases, those the previous version was already scored on, the ones added since)
into the Dice per structure and its mean over the structures. The result, JSON-ready::

    {"new": {"test": {"liver": 0.91, ..., "mean": 0.88}, "test_old": {...}, "test_new": {...}},
     "previous": {...}}
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

Scores = dict[str, dict[str, dict[str, float]]]  # model -> group -> structure or "mean" -> Dice
Scorer = Callable[[Path, Mapping[str, Path], Mapping[str, Sequence[str]], str], Scores]
DEFAULT_MARGIN = 0.02  # Dice points a new version may lose on a structure, or on the mean


def score_versions(
    dataset: Path,
    models: Mapping[str, Path],
    groups: Mapping[str, Sequence[str]],
    device: str = "auto",
) -> Scores:
    """Dice per structure (and "mean") of each model in ``models`` (name -> model or run
    folder) on each group of case ids of the dataset folder ``dataset``, in this process (the
    panel uses :class:`ScoringJob`, out of Slicer's process). Every case is segmented once per
    model with the engine's :func:`mtkd.infer.scoring.score_model`."""
    from mtkd.data.datasets import load_dataset
    from mtkd.devices import resolve_device
    from mtkd.infer.scoring import score_model
    from mtkd.modelfiles.model_io import load_model

    cases = _all_cases(groups)
    if not cases:
        return {name: {} for name in models}
    torch_device = resolve_device(device)
    index = load_dataset(dataset)
    result: Scores = {}
    for name, path in models.items():
        scored = score_model(load_model(path, torch_device), index, cases, torch_device).scores
        rows = [(score.case_id, score.structure, score.dice) for score in scored]
        result[name] = group_means(rows, groups)
    return result


def _all_cases(groups: Mapping[str, Sequence[str]]) -> list[str]:
    return sorted({case for ids in groups.values() for case in ids})


def group_means(
    rows: Sequence[tuple[str, str, float]], groups: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Per group of case ids: the mean per-volume Dice of each structure over the group's
    cases (NaN, a structure absent from a volume and its prediction, left out) and "mean",
    the mean over the structures (as :func:`mtkd.infer.evaluate.summarise`). ``rows``:
    (case, structure, Dice) per volume and structure. An empty group gets no entry."""
    result = {}
    for group, ids in groups.items():
        wanted = set(ids)
        per_structure: dict[str, list[float]] = {}
        for case, structure, dice in rows:
            if case in wanted:
                per_structure.setdefault(structure, []).append(dice)
        if not per_structure:
            continue
        means = {name: _mean(values) for name, values in per_structure.items()}
        means["mean"] = _mean(list(means.values()))
        result[group] = {name: round(value, 6) for name, value in means.items()}
    return result


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def read_scores_csv(path: Path) -> list[tuple[str, str, float]]:
    """(case, structure, Dice) of each row of a per-volume scores CSV (``mtkd evaluate``)."""
    with open(path, encoding="utf-8", newline="") as stream:
        return [(row["case"], row["structure"], _number(row["dice"]))
                for row in csv.DictReader(stream)]  # fmt: skip


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


class ScoringJob:
    """The versions scored by ``mtkd evaluate``, one model after the other, never in Slicer's
    process (which loads no torch): on ``worker`` (an :class:`MTKDLib.worker.EngineWorker`,
    Slicer's shared one, which keeps the models it loaded) or, without one, each in a
    background process of its own; :meth:`poll` from a timer.

    ``plan``: what :meth:`MTKDLib.distill_loop.DistillLoop.scoring_plan` returns."""

    def __init__(self, plan: Mapping[str, Any], python: str | None = None, worker: Any = None):
        self.plan = plan
        self.python = python
        self.worker = worker
        self.workdir = Path(tempfile.mkdtemp(prefix="mtkd-loop-scores-"))
        split = self.workdir / "test_cases.json"
        split.write_text(json.dumps({"test": _all_cases(plan["groups"])}), encoding="utf-8")
        self.split = split
        self.waiting = list(plan["models"].items())
        self.process: Any = None  # the running job: an MTKDLib.process.EngineJob
        self.current: str | None = None
        self.error: str | None = None
        self._next()

    def _next(self) -> None:
        self.current, model = self.waiting.pop(0)
        args = ["evaluate", str(model), str(self.plan["dataset"]), "--split", str(self.split),
                "--subset", "test", "--csv", str(self.workdir / f"{self.current}.csv"),
                "--device", str(self.plan["device"])]  # fmt: skip
        self.process = self.worker.run(args) if self.worker is not None else self._start(args)

    def _start(self, args: Sequence[str]) -> Any:
        from MTKDLib.process import BackgroundProcess, engine_command, engine_environment

        return BackgroundProcess(engine_command(args, self.python), env=engine_environment())

    def poll(self) -> bool:
        """Whether the job has ended (then :attr:`error` or :meth:`scores`). Never blocks."""
        if self.error is not None:
            return True
        self.process.read_lines()
        code = self.process.returncode
        if code is None:
            return False
        if code != 0:
            self.error = "\n".join(self.process.tail(20)) or f"mtkd evaluate ended with {code}"
            return True
        if self.waiting:
            self._next()
            return False
        return True

    def scores(self) -> Scores:
        return {name: group_means(read_scores_csv(self.workdir / f"{name}.csv"),
                                  self.plan["groups"]) for name in self.plan["models"]}  # fmt: skip

    def cancel(self) -> None:
        """Stop scoring; returns at once, and :meth:`poll` says it has ended ("cancelled"). A
        process is killed; a job on the worker stops at its next stage (the worker stays)."""
        running = self.process.returncode is None
        if self.error is None and (running or self.waiting):
            self.error, self.waiting = "cancelled", []
            if running:
                self.process.cancel(grace_seconds=0.0)


def gate_reasons(
    new: Mapping[str, float],
    previous: Mapping[str, float],
    margin: float = DEFAULT_MARGIN,
    previous_name: str = "the previous version",
) -> list[str]:
    """Why the version scored ``new`` must not replace the one scored ``previous`` (both:
    structure or "mean" -> Dice on the same cases): one sentence per structure, and for the
    mean, where it is worse by more than ``margin``. Empty: it may become current."""
    reasons = []
    for structure, before in previous.items():
        after = new.get(structure)
        if after is None or not math.isfinite(after) or not math.isfinite(before):
            continue
        if after < before - margin:
            what = "mean Dice" if structure == "mean" else f"{structure}: Dice"
            reasons.append(
                f"{what} {after:.3f} against {before:.3f} for {previous_name} (worse by "
                f"{before - after:.3f}, more than the margin {margin:.3f})"
            )
    return reasons


def score_table(scores: Mapping[str, Any]) -> str:
    """A version's stored scores as short lines for the panel ("test: mean 0.88 (previous
    0.86); liver 0.91 (0.90) ...")."""
    new, previous = scores.get("new", {}), scores.get("previous", {})
    lines = []
    for group, values in new.items():
        parts = []
        for structure, dice in values.items():
            before = previous.get(group, {}).get(structure)
            shown = f"{structure} {dice:.3f}"
            parts.append(shown if before is None else f"{shown} ({before:.3f})")
        lines.append(f"{group}: " + ", ".join(parts))
    return "\n".join(lines)
