"""Running a protocol: check the dataset, then train its selected stages in order in
``RUNS/<stage>`` (a finished stage is skipped, a stopped one resumed: the run folder's rule,
:meth:`mtkd.run_folder.RunDir.check_holds`), then write the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mtkd.errors import MTKDError
from mtkd.protocols.report import evaluate_protocol, format_report, write_report
from mtkd.protocols.specification import Protocol, require_filled, select_stages
from mtkd.run_folder import FINISHED, STOPPED, RunDir

__all__ = ["check_expectations", "run_protocol"]


def check_expectations(protocol: Protocol) -> None:
    """The dataset has the layout and structures the protocol expects (clear errors early)."""
    from mtkd.data.datasets import load_dataset

    config = protocol.stages[0].config
    dataset = load_dataset(config.data.source, labels_json=config.data.labels_json)
    layout = protocol.expects.get("layout")
    if layout and dataset.layout != layout:
        raise MTKDError(
            f"protocol '{protocol.name}' expects a {layout.upper()} dataset (dataset.json, "
            f"imagesTr/, labelsTr/), found the '{dataset.layout}' layout; see README "
            "'Protocols' for how to get the data",
            dataset.root,
        )
    wanted = list(protocol.expects.get("structures") or [])
    missing = [name for name in wanted if name not in dataset.labels.names]
    if missing:
        raise MTKDError(
            f"protocol '{protocol.name}' needs the structure(s) {', '.join(missing)}; the "
            f"dataset has {', '.join(dataset.labels.names)}",
            dataset.root,
        )


def run_protocol(
    protocol: Protocol,
    runs: str | Path,
    selection: Iterable[str] | None = None,
    *,
    device: str = "auto",
    evaluate: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Run the selected stages in order (skip finished ones, resume stopped ones), then
    evaluate every finished model of the protocol; returns the report (None without).

    One protocol process per ``runs`` folder (its lock; each stage's run folder has its own).
    """
    from mtkd.folder_lock import FolderLock

    require_filled(protocol)
    runs = Path(runs)
    check_expectations(protocol)
    with FolderLock(runs, f"mtkd protocol {protocol.name}"):
        return _run_stages(protocol, runs, selection, device, evaluate, log)


def _run_stages(
    protocol: Protocol,
    runs: Path,
    selection: Iterable[str] | None,
    device: str,
    evaluate: bool,
    log: Callable[[str], None],
) -> dict[str, Any] | None:
    """The stage loop of :func:`run_protocol`, under the ``runs`` folder's lock."""
    from mtkd.engine.trainer import Trainer

    for stage in select_stages(protocol, selection):
        run_dir = runs / stage.name
        folder = RunDir(run_dir)
        state = folder.state
        folder.check_holds(
            stage.config, f"stage '{stage.name}': use another --runs folder or remove this one"
        )
        if state == FINISHED:
            log(f"[{protocol.name}] {stage.name}: done, skipped ({folder.model})")
            continue
        if stage.is_student and stage.config.distill is not None:  # no-KD twins too
            teacher = Path(stage.config.distill.teacher)
            ours = teacher.parent == runs.resolve()
            if (ours and RunDir(teacher).state != FINISHED) or not teacher.exists():
                raise MTKDError(
                    f"stage '{stage.name}' needs its teacher, which has no model yet; run "
                    f"the teacher first (--stage {teacher.name if ours else 'teacher'})",
                    teacher,
                )
        if state == STOPPED:
            log(f"[{protocol.name}] {stage.name}: resuming from its checkpoint")
            Trainer(folder.load_config(), run_dir, resume=True, log=log).run()
        else:
            log(f"[{protocol.name}] {stage.name}: training ({stage.config.kind})")
            Trainer(stage.config, run_dir, log=log).run()
    if not evaluate:
        return None
    report = evaluate_protocol(protocol, runs, device=device, log=log)
    write_report(report, runs)
    log(format_report(report))
    log(f"report: {runs / 'report.md'} and {runs / 'report.json'}")
    return report
