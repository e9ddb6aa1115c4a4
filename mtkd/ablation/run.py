"""``mtkd ablate``: a grid of distillation variants, trained and scored alike.

The configuration (see :mod:`mtkd.ablation.grid`) is a distillation run config, the recipe every
cell shares, plus an ``ablation:`` section: subsets of the thesis pairs (E-E, B-B, D-D) x feature
losses x output losses (or an explicit list of cells, which may set or sweep distill keys), the
no-KD student and the teacher, over several seeds and optionally several split seeds. Every run
has the same data, recipe and epochs; the seed sets ``train.seed``, the split seed
``split.seed``. Each run is scored on its split's test cases (per-volume Dice and HD95 on the
original grid, as ``mtkd evaluate``)::

    ABL/ablation.yaml              the resolved grid (a different grid is refused here, one
                                   that gained or dropped cells continues); its paths
                                   relative to ABL, absolute beside them, as in a run
    ABL/cells/<cell>/seed<k>/      a normal run folder per cell and seed (with split_seeds:
                                   cells/<cell>/split<j>/seed<k>/); its report/ holds
                                   test_scores.csv (per volume) and ablation_result.json;
                                   a sub-cell that repeats a cell has none (that cell's)
    ABL/teacher/                   the teacher's test scores (the teacher is not retrained;
                                   with split_seeds: teacher/split<j>/)
    ABL/results.csv                one row per run (cell x split seed x seed, and the teacher)
    ABL/runs.csv                   one row per run, test case and structure (rewritten after
                                   every run; :mod:`mtkd.ablation.evidence`)
    ABL/summary.json, evidence.md  per method: test Dice, paired difference against no KD with
                                   its 95 % bootstrap interval, the sub-cell and the
                                   recommended cell chosen on validation Dice
    ABL/summary.csv, summary.md    one row per cell: mean ± sample std over runs
    ABL/plots/dice.png             Dice and HD95 per cell with error bars (needs matplotlib)
    ABL/plots/curves.png           validation Dice and training loss per epoch, one line a cell
    ABL/tensorboard/<cell>/seed<k> the runs' events as TensorBoard scalars (--tensorboard)
    ABL/.mtkd.lock                 while a grid runs here (a second one is refused at once)
    ABL/jobs/                      with --jobs N: each child run's config and log

Running it again continues: a finished run (its model exported) is scored from its cached
result, a run with a checkpoint is resumed exactly, the others are started. Ctrl-C or SIGTERM
stops the run in progress at a safe point (its checkpoint saved) and ends the grid. With
``ablation.sweep_selection`` the sweeps' chosen sub-cells train their other seeds in a second
pass (:mod:`mtkd.ablation.plan`). With
``--jobs N`` (:mod:`mtkd.ablation.parallel`) N runs train at once, each in a child process, and
are scored in the grid's order: the files written are the same as with one job.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtkd.ablation.evidence import (
    RUNS_FIELDS,
    evidence_markdown,
    evidence_summary,
    runs_rows,
)
from mtkd.ablation.folder import claim_folder, refuse_unrelated
from mtkd.ablation.grid import NO_KD, TEACHER, Ablation, Cell
from mtkd.ablation.grid_config import ablation_from_dict, load_ablation
from mtkd.ablation.parallel import Job, JobPool, JobsInterrupted
from mtkd.ablation.plan import (
    Run,
    first_pass,
    planned_runs,
    second_pass,
    swept_methods,
    trained_as,
)
from mtkd.ablation.report import (
    markdown_report,
    markdown_table,
    result_rows,
    summarise_cells,
    write_csv,
    write_plots,
)
from mtkd.ablation.results import run_history, run_result, teacher_result
from mtkd.ablation.tensorboard import mirror_run, summary_writer_class
from mtkd.config import RunConfig
from mtkd.data.atomic import atomic_write_bytes
from mtkd.data.datasets import DatasetIndex, load_dataset
from mtkd.data.splits import split_cases
from mtkd.devices import resolve_device
from mtkd.engine.signals import StopRequest
from mtkd.engine.trainer import Trainer, TrainingInterrupted, resume_run
from mtkd.errors import MTKDError
from mtkd.folder_lock import FolderLock
from mtkd.run_folder import FINISHED, STOPPED, RunDir


@dataclass
class AblationResult:
    folder: Path
    results: list[dict[str, Any]]  # one per run (the teacher first), as in results.csv
    summary: list[dict[str, Any]]  # one per cell, as in summary.csv
    table: str  # the Markdown table of summary.md
    files: dict[str, Path] = field(default_factory=dict)
    # run folder (relative to ``folder``) -> "trained", "resumed" or "finished" (earlier)
    states: dict[str, str] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)  # summary.json


def run_ablation(
    ablation: Ablation,
    output: str | Path,
    *,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    tensorboard: bool = False,
    jobs: int = 1,
    cells: Sequence[str] | None = None,
) -> AblationResult:
    """Train and score every cell x seed of ``ablation`` in ``output`` (continuing what an
    earlier call left there), then write the tables and plots. ``jobs`` > 1 trains that many
    runs at once, each in a child process (:mod:`mtkd.ablation.parallel`); the results are
    the same as with one. ``cells`` (names of cells, or of swept methods for all their
    sub-cells) runs only those, leaving the others for a later call; the reports hold them and
    every other cell whose runs are all finished in ``output`` (an earlier pass's), and name
    the cells not run."""
    if jobs < 1:
        raise MTKDError(f"--jobs must be at least 1, got {jobs}")
    selected = selected_cells(ablation, cells)
    root = Path(output)
    if tensorboard:
        summary_writer_class()  # no tensorboard: say so before any training
    for split in ablation.splits:  # the data and each teacher, named by key, before any folder
        ablation.run_config(ablation.cells[0], ablation.seeds[0], split).check_paths()
    base = ablation.base
    dataset = load_dataset(base.data.source, labels_json=base.data.labels_json)
    tests = {split: _test_cases(base, dataset, split) for split in ablation.splits}
    _check_teachers(ablation)
    refuse_unrelated(root)  # before the lock file is written there
    with FolderLock(root, "mtkd ablate"):  # one grid process per folder (each run locks its own)
        claim_folder(root, ablation)
        return _run_grid(ablation, selected, root, dataset, tests, log, progress, tensorboard, jobs)


def selected_cells(ablation: Ablation, names: Sequence[str] | None) -> list[Cell]:
    """The grid's cells named in ``names`` (a swept method's name selects its sub-cells), in
    the grid's order; all of them for None. MTKDError naming an unknown cell."""
    if not names:
        return list(ablation.cells)
    known = list(dict.fromkeys(n for cell in ablation.cells for n in (cell.family, cell.name)))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise MTKDError(
            f"--cells: this grid has no cell {', '.join(map(repr, unknown))}; its cells are "
            f"{', '.join(known)}"
        )
    return [cell for cell in ablation.cells if cell.name in names or cell.family in names]


def _check_teachers(ablation: Ablation) -> None:
    """Open each split seed's teacher once (on the CPU) before any folder is written, so that
    a teacher that cannot be read stops the grid with its own error."""
    from mtkd.modelfiles.sources import is_stored_output, load_any_model

    for teacher in dict.fromkeys(ablation.teacher(split) for split in ablation.splits):
        if not is_stored_output(teacher):
            load_any_model(teacher, "cpu")


def _run_grid(
    ablation: Ablation,
    cells: list[Cell],
    root: Path,
    dataset: DatasetIndex,
    tests: dict[int, list[str]],
    log: Callable[[str], None],
    progress: bool | None,
    tensorboard: bool,
    jobs: int = 1,
) -> AblationResult:
    device = resolve_device(ablation.base.train.device)
    grid = _GridPass(ablation, root, dataset, tests, device, log, progress, tensorboard)
    others = [cell for cell in ablation.cells if cell not in cells]
    finished = grid.finished_cells(others)  # reported too, nothing to train
    cells = [cell for cell in ablation.cells if cell in cells or cell in finished]
    grid.total = planned_runs(ablation, cells)
    pool = JobPool(root / "jobs", jobs, device.type == "cpu", log) if jobs > 1 else None
    with StopRequest() as stop, contextlib.ExitStack() as cleanup:
        if pool is not None:
            cleanup.callback(pool.close)  # an error stops the children still running
        grid.pool, grid.stop = pool, stop
        first = first_pass(ablation, cells)
        grid.queue(first)
        if ablation.teacher_row:
            grid.score_teachers()
        grid.run(first)
        second = second_pass(ablation, cells, grid.results)  # the sweeps' chosen sub-cells
        grid.queue(second)
        grid.run(second)
    test = [case for split in ablation.splits for case in tests[split]]
    not_run = [cell.name for cell in ablation.cells if cell not in cells]
    return _write_reports(
        ablation, root, grid.results, grid.histories, grid.states, test, log, not_run
    )


@dataclass
class _GridPass:
    """Trains (or resumes, or skips) and scores the runs of a grid, one pass after another,
    keeping their results, histories and states."""

    ablation: Ablation
    root: Path
    dataset: DatasetIndex
    tests: dict[int, list[str]]
    device: Any
    log: Callable[[str], None]
    progress: bool | None
    tensorboard: bool
    pool: JobPool | None = None
    stop: StopRequest | None = None
    total: int = 0
    done: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)
    histories: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)

    def folder(self, cell: Cell, split: int, seed: int) -> Path:
        return self.root / "cells" / cell.name / _run_folder(self.ablation, split, seed)

    def place(self, cell: Cell, split: int, seed: int) -> tuple[Cell, Path, str, RunConfig]:
        """Where the run (split seed, seed) of ``cell`` is trained: the cell whose folder holds
        it (itself, or the cell a sub-cell repeats), the folder, its path relative to the
        grid and its config."""
        source = trained_as(self.ablation, cell)
        run_dir = self.folder(source, split, seed)
        relative = run_dir.relative_to(self.root).as_posix()
        return source, run_dir, relative, self.ablation.run_config(source, seed, split)

    def finished_cells(self, cells: list[Cell]) -> list[Cell]:
        """The cells of ``cells`` whose runs (both passes') are all finished in the folder: a
        cell outside any sweep, or every sub-cell of a swept method."""
        ablation = self.ablation

        def finished(runs: list[Run]) -> bool:
            return all(
                RunDir(self.folder(trained_as(ablation, c), split, seed)).state == FINISHED
                for c, split, seed in runs
            )

        done = [c for c in cells if not c.method and finished(first_pass(ablation, [c]))]
        for subs in swept_methods(ablation, cells).values():
            first = first_pass(ablation, subs)
            if not finished(first):
                continue
            chosen_on = [self._result(c, split, seed) for c, split, seed in first]
            if finished(second_pass(ablation, subs, chosen_on)):
                done += subs
        return done

    def _result(self, cell: Cell, split: int, seed: int) -> dict[str, Any]:
        """The scores of a finished run of ``cell`` (cached beside the run); a sub-cell that
        repeats a cell gets that cell's run under its own name."""
        source, run_dir, relative, _ = self.place(cell, split, seed)
        result = run_result(
            self.ablation, source, (split, seed), run_dir, relative, self.dataset,
            self.tests[split], self.device,
        )  # fmt: skip
        if source is not cell:  # the same run, in the sweep's row too
            result = {**result, "cell": cell.name, "method": cell.family}
            result["same_run_as"] = source.name
        return result

    def queue(self, plan: list[Run]) -> None:
        """With ``--jobs``: hand every run of ``plan`` not yet finished to the pool, in order."""
        if self.pool is None:
            return
        for cell, split, seed in plan:
            _, run_dir, key, config = self.place(cell, split, seed)
            if key not in self.pool and _needs_training(config, run_dir):
                resume = RunDir(run_dir).state == STOPPED
                self.pool.add(Job(key, config, run_dir, resume))
        self.pool.start()

    def score_teachers(self) -> None:
        for split in self.ablation.splits:
            folder = self.root / TEACHER
            if self.ablation.split_seeds is not None:
                folder = folder / f"split{split}"
            teacher = self.ablation.teacher(split)
            row = teacher_result(
                teacher, folder, self.dataset, self.tests[split], self.device, self.log
            )
            self.results.append({**row, "split_seed": split})

    def run(self, plan: list[Run]) -> None:
        """Train or wait for each run of ``plan`` in order, score it and rewrite runs.csv."""
        for cell, split, seed in plan:
            self.done += 1
            source, run_dir, relative, config = self.place(cell, split, seed)
            what = _what(self.ablation, cell, split, seed)
            if self._stop_requested():
                raise TrainingInterrupted(_stopped(what, self.done - 1, self.total, self.root))
            try:
                if self.pool is not None and relative in self.pool:
                    state = self.pool.wait(relative, self._stop_requested)
                else:
                    state = _train(config, run_dir, self.progress, self.log)
            except (TrainingInterrupted, JobsInterrupted):
                message = _stopped(what, self.done - 1, self.total, self.root)
                raise TrainingInterrupted(message) from None
            self.states.setdefault(relative, state)  # as first met: trained, not "finished"
            self._record(cell, source, (split, seed), relative, what)

    def _stop_requested(self) -> bool:
        return self.stop is not None and self.stop.requested

    def _record(
        self, cell: Cell, source: Cell, run: tuple[int, int], relative: str, what: str
    ) -> None:
        """Score the run (split seed, seed) of ``cell``, trained in ``source``'s folder."""
        run_dir = self.root / relative
        result = self._result(cell, *run)
        self.results.append(result)
        _write_runs_csv(self.root, self.results)
        if self.pool is not None:
            self.pool.start()  # slots freed while this run was scored
        self.histories.setdefault(cell.name, []).append(run_history(RunDir(run_dir)))
        self.log(
            f"[{self.done}/{self.total}] {what}: {self.states[relative]}; test Dice "
            f"{result['dice']:.3f}, HD95 {result['hd95_mm']:.2f} mm ({result['missed']} missed)"
        )
        if self.tensorboard and source is cell:
            mirror_run(run_dir, self.root / "tensorboard" / relative.removeprefix("cells/"))


def _run_folder(ablation: Ablation, split: int, seed: int) -> str:
    """``seed<k>``, or ``split<j>/seed<k>`` for a grid with split_seeds."""
    return f"seed{seed}" if ablation.split_seeds is None else f"split{split}/seed{seed}"


def _what(ablation: Ablation, cell: Cell, split: int, seed: int) -> str:
    if ablation.split_seeds is None:
        return f"{cell.name} seed {seed}"
    return f"{cell.name} split {split} seed {seed}"


def _stopped(what: str, done: int, total: int, root: Path) -> str:
    return (
        f"the ablation stopped at {what} ({done} of {total} runs finished); "
        f"run the same `mtkd ablate` command (-o {root}) again to continue"
    )


def _write_runs_csv(root: Path, results: list[dict[str, Any]]) -> Path:
    """``runs.csv`` of the runs finished so far (rewritten whole, atomically)."""
    rows = runs_rows(results)
    write_csv(root / "runs.csv", rows, fields=RUNS_FIELDS)
    return root / "runs.csv"


def _test_cases(base: RunConfig, dataset: DatasetIndex, seed: int) -> list[str]:
    """The test cases of the split with ``seed`` (computed as the trainer does)."""
    split = base.split
    test = split_cases(
        dataset.cases,
        val_fraction=split.val_fraction,
        test_fraction=split.test_fraction,
        seed=seed,
        student_fraction=split.student_fraction,
        fixed=split.fixed,
    ).test
    if not test:
        raise MTKDError("the split has no test cases to score the runs on", path=dataset.root)
    return list(test)


def _needs_training(config: RunConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` has no exported model yet (MTKDError if it holds another run)."""
    folder = RunDir(run_dir)
    folder.check_holds(config, "delete it to run this cell afresh")
    return folder.state != FINISHED


def _train(
    config: RunConfig, run_dir: Path, progress: bool | None, log: Callable[[str], None]
) -> str:
    """Run, resume or skip one run folder; return what was done."""
    if not _needs_training(config, run_dir):
        return "finished"
    if RunDir(run_dir).state == STOPPED:
        resume_run(run_dir, progress=progress, log=log)
        return "resumed"
    Trainer(config, run_dir, progress=progress, log=log).run()
    return "trained"


def _write_reports(
    ablation: Ablation,
    root: Path,
    results: list[dict[str, Any]],
    histories: dict[str, list[list[dict[str, Any]]]],
    states: dict[str, str],
    test: list[str],
    log: Callable[[str], None],
    not_run: list[str],
) -> AblationResult:
    structures = list(
        dict.fromkeys(name for result in results for name in result.get("per_structure") or {})
    )
    files = {"results": root / "results.csv", "summary_csv": root / "summary.csv"}
    write_csv(files["results"], result_rows(results, structures))
    summary = summarise_cells(results, structures)
    write_csv(files["summary_csv"], summary)
    files["summary_md"] = root / "summary.md"
    text = markdown_report(
        ablation.name,
        summary,
        test_cases=test,
        structures=structures,
        seeds=ablation.seeds,
        epochs=ablation.base.train.epochs,
        split_seeds=ablation.split_seeds,
    )
    atomic_write_bytes(files["summary_md"], text.encode())
    files.update(write_plots(root / "plots", summary, histories, log))
    files["runs"] = _write_runs_csv(root, results)
    evidence = evidence_summary(
        results,
        student=ablation.name,
        cohort=Path(ablation.base.data.source).name,
        seeds=len(ablation.seeds),
        split_seeds=len(ablation.splits),
        not_run=not_run,
        selection=ablation.selection,
    )
    files["summary_json"] = root / "summary.json"
    atomic_write_bytes(files["summary_json"], (json.dumps(evidence, indent=2) + "\n").encode())
    files["evidence_md"] = root / "evidence.md"
    atomic_write_bytes(files["evidence_md"], evidence_markdown(evidence).encode())
    return AblationResult(root, results, summary, markdown_table(summary), files, states, evidence)


__all__ = [
    "NO_KD",
    "TEACHER",
    "Ablation",
    "AblationResult",
    "Cell",
    "ablation_from_dict",
    "load_ablation",
    "mirror_run",
    "run_ablation",
]
