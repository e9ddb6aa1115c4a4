"""``mtkd ablate``: a grid of distillation variants, trained and scored alike.

The configuration (see :mod:`mtkd.ablation.grid`) is a distillation run config, the recipe every
cell shares, plus an ``ablation:`` section: subsets of the thesis pairs (E-E, B-B, D-D) x feature
losses x output losses (or an explicit list of cells, which may set or sweep distill keys), the
no-KD student and the teacher, over several seeds and optionally several split seeds. Every run
has the same data, recipe and epochs; the seed sets ``train.seed``, the split seed
``split.seed``. Each run is scored on its split's test cases (per-volume Dice and HD95 on the
original grid, as ``mtkd evaluate``)::

    ABL/ablation.yaml              the resolved grid (a different grid is refused here); its
                                   paths relative to ABL, absolute beside them, as in a run
    ABL/cells/<cell>/seed<k>/      a normal run folder per cell and seed (with split_seeds:
                                   cells/<cell>/split<j>/seed<k>/); its report/ holds
                                   test_scores.csv (per volume) and ablation_result.json
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
``--jobs N`` (:mod:`mtkd.ablation.parallel`) N runs train at once, each in a child process, and
are scored in the grid's order: the files written are the same as with one job.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtkd.ablation.evidence import (
    RUNS_FIELDS,
    evidence_markdown,
    evidence_summary,
    runs_rows,
)
from mtkd.ablation.grid import (
    NO_KD,
    NO_OUTPUT,
    TEACHER,
    Ablation,
    Cell,
    ablation_from_dict,
    grid_differences,
    load_ablation,
)
from mtkd.ablation.parallel import Job, JobPool, JobsInterrupted
from mtkd.ablation.report import (
    markdown_report,
    markdown_table,
    result_rows,
    summarise_cells,
    write_csv,
    write_plots,
)
from mtkd.ablation.tensorboard import mirror_run, summary_writer_class
from mtkd.config import RunConfig
from mtkd.config_paths import (
    ABSOLUTE_PATHS,
    PATH_KEYS,
    is_path_value,
    relative_paths,
    resolve_paths,
)
from mtkd.data.atomic import atomic_write_bytes
from mtkd.data.datasets import DatasetIndex, load_dataset
from mtkd.data.splits import split_cases
from mtkd.devices import resolve_device
from mtkd.engine.signals import StopRequest
from mtkd.engine.trainer import Trainer, TrainingInterrupted, resume_run
from mtkd.errors import MTKDError
from mtkd.folder_lock import LOCK_NAME, FolderLock
from mtkd.infer.scoring import score_model
from mtkd.metrics import MISSED
from mtkd.modelfiles.model_io import LoadedModel, load_model
from mtkd.run_folder import FINISHED, STOPPED, RunDir, read_events

# 2: HD95 with the missed-structure penalty, missed/spurious counts; 3: per-case scores,
# split seed, validation Dice
RESULT_FORMAT = 3
RESULT_FILE = "ablation_result.json"  # in each run's report/


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
    sub-cells) runs and reports only those, leaving the others for a later call; the reports
    then name the cells not run."""
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
    _refuse_unrelated(root)  # before the lock file is written there
    with FolderLock(root, "mtkd ablate"):  # one grid process per folder (each run locks its own)
        _claim_folder(root, ablation)
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
    plan = [
        (cell, split, seed)
        for cell in cells
        for split in ablation.splits
        for seed in ablation.seeds
    ]
    results: list[dict[str, Any]] = []
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    states: dict[str, str] = {}
    pool = JobPool(root / "jobs", jobs, device.type == "cpu", log) if jobs > 1 else None
    with StopRequest() as stop, contextlib.ExitStack() as cleanup:
        if pool is not None:
            cleanup.callback(pool.close)  # an error stops the children still running
            for cell, split, seed in plan:  # every run not yet finished, in plan order
                run_dir = root / "cells" / cell.name / _run_folder(ablation, split, seed)
                config = ablation.run_config(cell, seed, split)
                if _needs_training(config, run_dir):
                    key = run_dir.relative_to(root).as_posix()
                    resume = RunDir(run_dir).state == STOPPED
                    pool.add(Job(key, config, run_dir, resume))
            pool.start()
        if ablation.teacher_row:
            for split in ablation.splits:
                folder = root / TEACHER
                if ablation.split_seeds is not None:
                    folder = folder / f"split{split}"
                teacher = ablation.teacher(split)
                row = _teacher_result(teacher, folder, dataset, tests[split], device, log)
                results.append({**row, "split_seed": split})
        for index, (cell, split, seed) in enumerate(plan, start=1):
            run_dir = root / "cells" / cell.name / _run_folder(ablation, split, seed)
            relative = run_dir.relative_to(root).as_posix()
            what = _what(ablation, cell, split, seed)
            label = f"[{index}/{len(plan)}] {what}"
            if stop.requested:
                raise TrainingInterrupted(_stopped(what, index - 1, len(plan), root))
            config = ablation.run_config(cell, seed, split)
            try:
                if pool is not None and relative in pool:
                    states[relative] = pool.wait(relative, lambda: stop.requested)
                else:
                    states[relative] = _train(config, run_dir, progress, log)
            except (TrainingInterrupted, JobsInterrupted):
                raise TrainingInterrupted(_stopped(what, index - 1, len(plan), root)) from None
            result = _run_result(
                ablation, cell, (split, seed), run_dir, relative, dataset, tests[split], device
            )
            results.append(result)
            _write_runs_csv(root, results)
            if pool is not None:
                pool.start()  # slots freed while this run was scored
            histories.setdefault(cell.name, []).append(_history(RunDir(run_dir)))
            log(
                f"{label}: {states[relative]}; test Dice {result['dice']:.3f}, "
                f"HD95 {result['hd95_mm']:.2f} mm ({result['missed']} missed)"
            )
            if tensorboard:
                mirror_run(run_dir, root / "tensorboard" / relative.removeprefix("cells/"))
    test = [case for split in ablation.splits for case in tests[split]]
    not_run = [cell.name for cell in ablation.cells if cell not in cells]
    return _write_reports(ablation, root, results, histories, states, test, log, not_run)


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


def _grid_paths(grid: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """The places of a grid (``Ablation.to_dict()``) that hold a file or folder: (mapping,
    key) for the teacher, each cell's teacher and the recipe's path keys."""
    places = [(grid, "teacher", "distill.teacher")]
    for cell in grid.get("cells") or []:
        places += [(cell["distill"], name, f"distill.{name}") for name in ("teacher", "unlabelled")]
    for key in PATH_KEYS:
        if key == "distill.teacher":
            continue
        *parents, last = key.split(".")
        mapping = grid.get("recipe") or {}
        for part in parents:
            mapping = mapping.get(part) or {}
        places.append((mapping, last, key))
    return [
        (mapping, last) for mapping, last, key in places if is_path_value(mapping.get(last), key)
    ]


def _grid_with_relative_paths(grid: dict[str, Any], root: Path) -> dict[str, Any]:
    """``grid`` as ``ablation.yaml`` stores it: paths relative to the ablation folder ``root``
    and, under ``absolute_paths``, each relative path's absolute form (as a run's config)."""
    grid = copy.deepcopy(grid)
    section: dict[str, str] = {}
    for mapping, key in _grid_paths(grid):
        written, absolute = relative_paths({"path": mapping[key]}, root, keys=("path",))
        mapping[key] = written["path"]
        if "path" in absolute:
            section[written["path"]] = absolute["path"]
    return {**grid, ABSOLUTE_PATHS: section} if section else grid


def _grid_with_absolute_paths(grid: dict[str, Any], root: Path) -> dict[str, Any]:
    """A stored grid with its paths absolute: read from ``root`` where they exist there (the
    folder moved with its data), else the absolute path stored beside them."""
    grid = copy.deepcopy(grid)
    section = grid.pop(ABSOLUTE_PATHS, None)
    section = section if isinstance(section, dict) else {}
    for mapping, key in _grid_paths(grid):
        fallback = {"path": section[mapping[key]]} if mapping[key] in section else None
        resolved, _ = resolve_paths({"path": mapping[key]}, root, fallback, keys=("path",))
        mapping[key] = resolved["path"]
    return grid


def _claim_folder(root: Path, ablation: Ablation) -> None:
    """Write ``ablation.yaml`` into a new or empty folder; refuse one holding another grid.
    Paths are compared where they point, so a grid moved together with its data continues."""
    grid = _grid_with_absolute_paths(ablation.to_dict(), Path.cwd())
    path = root / "ablation.yaml"
    if path.is_file():
        try:
            stored = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise MTKDError(f"not valid YAML ({error})", path=path) from None
        stored = _grid_with_absolute_paths(stored, root) if isinstance(stored, dict) else {}
        differences = grid_differences(stored, grid)
        if differences:
            raise MTKDError(
                "this folder holds another ablation grid (it differs in "
                f"{', '.join(differences)}); continue it with the same configuration and "
                "options, or choose another output folder",
                path=root,
            )
        return
    _refuse_unrelated(root)
    root.mkdir(parents=True, exist_ok=True)
    stored = _grid_with_relative_paths(grid, root)
    atomic_write_bytes(path, yaml.safe_dump(stored, sort_keys=False).encode())


def _refuse_unrelated(root: Path) -> None:
    """MTKDError unless ``root`` is missing, empty or holds an ablation (its lock aside)."""
    if (root / "ablation.yaml").is_file() or not root.exists():
        return
    if not root.is_dir() or any(path.name != LOCK_NAME for path in root.iterdir()):
        raise MTKDError(
            "not an ablation folder (no ablation.yaml) and not empty; choose another output folder",
            path=root,
        )


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


def _run_result(
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
    history = _history(folder)
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


def _teacher_result(
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


def _history(folder: RunDir) -> list[dict[str, Any]]:
    """The run's per-epoch records (report/history.json, else the metrics events)."""
    path = folder.report / "history.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    by_epoch = {e["epoch"]: e for e in read_events(folder.events) if e.get("type") == "metrics"}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


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
