"""Keep the finished runs of an evidence grid in the repository, and put them back into a grid
folder written afresh (a machine wiped between sessions), so that ``mtkd ablate`` counts them
as finished instead of training them again.

    python bench/kd_evidence/archive.py save ABL ARCHIVE --cohort COHORT [--teacher RUN ...]
    python bench/kd_evidence/archive.py restore ARCHIVE ABL --cohort COHORT [--teacher RUN ...]

``save`` copies the light files of every finished and scored run of the grid folder ABL
(``cells/<cell>/[split<j>/]seed<k>/``: its config, split, fingerprint, events, the model's
metadata and the report; never the weights or checkpoints) to the same place under
``ARCHIVE/cells/``, with ``ABL/ablation.yaml``, and writes ``ARCHIVE/manifest.json``: the
cohort's digest (``cohort_digest.py``) and the weights SHA-256 of each ``--teacher`` run, by
split seed (read from its name, ``...-split<j>``). A distilled run is archived only when it was
distilled from that teacher (its fingerprint says), and archived distilled runs of a teacher
that was retrained since are removed, so that every archived run matches the manifest.

``restore`` refuses everything when COHORT is not the archived runs' cohort (exit 1). It copies
each archived run into ABL where that run's folder is missing or holds no checkpoint and no
model (a run there is never overwritten); a distilled run (a cell other than ``no_kd``) only
when the current ``--teacher`` of its split seed has the weights recorded in the manifest. A
missing ARCHIVE restores nothing. A restored run has no weights: the grid scores it from its
cached result, and ``real_ct.py`` leaves it out (its rows are already in real_ct.csv).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts

from cohort_digest import cohort_digest
from real_ct import grid_runs, teacher_runs

from mtkd.ablation.grid import NO_KD
from mtkd.ablation.results import RESULT_FILE, RESULT_FORMAT
from mtkd.data.atomic import atomic_write_bytes
from mtkd.modelfiles.files import METADATA, WEIGHTS, model_folder
from mtkd.run_folder import RunDir

MANIFEST = "manifest.json"
GRID_FILE = "ablation.yaml"  # `mtkd ablate` refuses a folder that is not empty and has none
_LAYOUT = RunDir(Path())
LIGHT_FILES = [
    _LAYOUT.config,
    _LAYOUT.split,
    _LAYOUT.fingerprint,
    _LAYOUT.events,
    _LAYOUT.report / RESULT_FILE,
    _LAYOUT.report / "test_scores.csv",
    _LAYOUT.report / "history.json",
    _LAYOUT.model_metadata,  # last: a run copied part of the way is not finished
]
"""What a finished run needs to be skipped and scored from its cache, relative to its folder."""


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def teacher_weights(teachers: list[str]) -> dict[str, str]:
    """{split seed: weights SHA-256} of the finished ``teachers`` (run folders ``...-split<j>``)."""
    found = {}
    for _, split, _, run in teacher_runs(teachers):
        metadata = read_json(model_folder(run) / METADATA)
        if metadata and metadata.get("weights_sha256"):
            found[split] = metadata["weights_sha256"]
    return found


def distilled_from(run: Path) -> str:
    """The weights SHA-256 of the teacher that ``run`` was distilled from, as its fingerprint
    records it ("" when it records none)."""
    teacher = (read_json(RunDir(run).fingerprint) or {}).get("teacher") or {}
    files = (teacher.get("content") or {}).get("files") or {}
    return (files.get(WEIGHTS) or {}).get("sha256", "")


def has_current_result(run: Path) -> bool:
    """Whether the run's cached result is of this format, its weights and its test cases (the
    grid reads it instead of scoring the weights, which an archived run has not)."""
    folder = RunDir(run)
    result = read_json(folder.report / RESULT_FILE) or {}
    metadata = read_json(folder.model_metadata) or {}
    split = read_json(folder.split) or {}
    return (
        result.get("format") == RESULT_FORMAT
        and result.get("weights_sha256") is not None
        and result.get("weights_sha256") == metadata.get("weights_sha256")
        and result.get("test_cases") == split.get("test")
    )


def copy_light_files(source: Path, target: Path) -> bool:
    """Make ``target``'s light files those of ``source`` (each written atomically, the model's
    metadata last; one that ``source`` lacks removed). False when they already were."""
    changed = False
    for name in LIGHT_FILES:
        wanted, written = source / name, target / name
        if not wanted.is_file():
            if written.is_file():
                written.unlink()
                changed = True
            continue
        data = wanted.read_bytes()
        if written.is_file() and written.read_bytes() == data:
            continue
        written.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(written, data)
        changed = True
    return changed


def copy_file(source: Path, target: Path, replace: bool) -> None:
    """Copy the file ``source`` (if any) to ``target``, atomically; an existing ``target`` is
    left as it is unless ``replace``."""
    if not source.is_file() or (target.exists() and not replace):
        return
    data = source.read_bytes()
    if not target.is_file() or target.read_bytes() != data:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds a model or a checkpoint (a run that must not be overwritten)."""
    run = RunDir(folder)
    return run.model.exists() or (run.checkpoints.is_dir() and any(run.checkpoints.iterdir()))


def other_cohort(cohort: Path, archive: Path, digest: str, manifest: dict) -> str | None:
    """Why the runs of ``archive`` are not runs on ``cohort``; None when they are."""
    archived = manifest.get("cohort_digest")
    if archived == digest:
        return None
    return (
        f"{cohort} is not the cohort of the runs archived in {archive} (its digest is "
        f"{digest[:12]}..., theirs {str(archived)[:12]}...); write it again with the "
        "arguments of bench/kd_evidence/cohort.args, or delete the archive to run the grid "
        "afresh on this cohort"
    )


def teacher_mismatch(
    cell: str, split: str, distilled: dict[str, str], current: dict[str, str]
) -> str | None:
    """Why runs of ``cell`` at ``split``, distilled from the teacher weights ``distilled``
    (by split seed), are not runs of the ``current`` teachers; None when they are (or
    ``cell`` is the no-KD student, which has no teacher)."""
    if cell == NO_KD:
        return None
    name = f"split {split or '-'}"
    if not distilled.get(split):
        return f"{name}: no record of the teacher they were distilled from"
    if split not in current:
        return f"{name}: no finished --teacher of this split seed was given"
    if current[split] != distilled[split]:
        return (
            f"{name}: distilled from the teacher weights {distilled[split][:12]}..., the "
            f"current teacher's are {current[split][:12]}... (retrained since)"
        )
    return None


def remove_stale_runs(archive: Path, weights: dict[str, str]) -> int:
    """Remove the archived distilled runs whose teacher is not the one of ``weights`` for
    their split seed (it was retrained); how many."""
    stale = [
        run
        for cell, split, _, run in grid_runs(archive)
        if teacher_mismatch(cell, split, {split: distilled_from(run)}, weights)
    ]
    for run in stale:
        shutil.rmtree(run)
    return len(stale)


def save(grid: Path, archive: Path, cohort: Path, teachers: list[str]) -> int:
    """Archive the finished runs of ``grid``; 1 when the archive holds another cohort's."""
    digest = cohort_digest(cohort)
    manifest = read_json(archive / MANIFEST) or {}
    if manifest and (refusal := other_cohort(cohort, archive, digest, manifest)):
        print(f"archive save: {refusal}; nothing archived", file=sys.stderr)
        return 1
    weights = {**(manifest.get("teachers") or {}), **teacher_weights(teachers)}
    counts, left_out = Counter(), Counter()
    for cell, split, _, run in grid_runs(grid):
        if not has_current_result(run):
            left_out["not scored yet, or its cached result is stale"] += 1
        elif reason := teacher_mismatch(cell, split, {split: distilled_from(run)}, weights):
            left_out[reason] += 1
        else:
            target = archive / run.relative_to(grid)
            counts["archived" if copy_light_files(run, target) else "unchanged"] += 1
    removed = remove_stale_runs(archive, weights)
    copy_file(grid / GRID_FILE, archive / GRID_FILE, replace=True)
    archive.mkdir(parents=True, exist_ok=True)
    record = {"cohort_digest": digest, "teachers": dict(sorted(weights.items()))}
    atomic_write_bytes(archive / MANIFEST, (json.dumps(record, indent=2) + "\n").encode())
    for reason, count in left_out.items():
        print(f"archive save: {count} finished run(s) not archived: {reason}")
    print(
        f"archive save: {counts['archived']} run(s) archived, {counts['unchanged']} unchanged, "
        f"{removed} removed (distilled from a teacher retrained since) in {archive}"
    )
    return 0


def restore(archive: Path, grid: Path, cohort: Path, teachers: list[str]) -> int:
    """Copy the archived runs back into ``grid`` where it has none; 1 for another cohort."""
    manifest = read_json(archive / MANIFEST)
    if manifest is None:
        print(f"archive restore: no archive in {archive}; nothing to restore")
        return 0
    refusal = other_cohort(cohort, archive, cohort_digest(cohort), manifest)
    if refusal:
        print(f"archive restore: {refusal}; nothing restored", file=sys.stderr)
        return 1
    recorded, current = manifest.get("teachers") or {}, teacher_weights(teachers)
    counts, skipped = Counter(), Counter()
    for cell, split, _, run in grid_runs(archive):
        target = grid / run.relative_to(archive)
        if holds_a_run(target):
            counts["present"] += 1
        elif reason := teacher_mismatch(cell, split, recorded, current):
            skipped[reason] += 1
        else:
            copy_light_files(run, target)
            counts["restored"] += 1
    if counts["restored"]:
        copy_file(archive / GRID_FILE, grid / GRID_FILE, replace=False)
    for reason, count in skipped.items():
        print(f"archive restore: {count} distilled run(s) not restored; {reason}; they train again")
    print(
        f"archive restore: {counts['restored']} run(s) restored into {grid}, "
        f"{counts['present']} already there, {sum(skipped.values())} not restored"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, first, second in (("save", "grid", "archive"), ("restore", "archive", "grid")):
        command = commands.add_parser(name)
        command.add_argument(first, type=Path)
        command.add_argument(second, type=Path)
        command.add_argument("--cohort", type=Path, required=True)
        command.add_argument("--teacher", action="append", default=[])
    args = parser.parse_args(argv)
    if args.command == "save":
        return save(args.grid, args.archive, args.cohort, args.teacher)
    return restore(args.archive, args.grid, args.cohort, args.teacher)


if __name__ == "__main__":
    sys.exit(main())
