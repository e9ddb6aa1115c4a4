"""The annotate-then-distill loop, simulated turn by turn on an MSD cohort (issue #17 part 7):
does the loop's fine-tuning keep what earlier versions learned, with and without the anchor?

    python bench/loop_turns/run.py [OUT] [--cohort DIR] [--teacher RUN] [--turns 10] ...

The full measurement (issue #17 part 7), from the repository root, about 30 minutes on two CPU
cores (each fine-tuning run 3 epochs on 5 to 14 cases, then scored on 8 + up to 14 cases)::

    OMP_NUM_THREADS=2 python bench/loop_turns/run.py runs/loop-turns

The validation and test cases are pinned by patient, as the loop pins them: the teacher's own
validation and test cases when its run folder holds a split of this cohort (the teacher never
saw them), else a fifth of the patients each (``--seed``). The other patients, in an order
drawn by ``--seed``, are the cases a clinician would add: the first ``--start-cases`` train the
starting student (or ``--start-model`` is it), then each turn adds the next one and every
variant fine-tunes its own previous version on all cases added so far, as
:meth:`MTKDLib.distill_loop.DistillLoop.next_run` does (the panel's configuration, the loop's
:class:`MTKDLib.loop_recipe.FineTuneRecipe`, the split given explicitly, the same seed):

- ``plain``: the recipe without the anchor;
- ``anchor``: the recipe with the parent version as a second teacher (``distill.anchor``);
- ``fresh`` (not run unless asked): the parent's weights at the full learning rate and
  schedule, as loop runs were before the recipe.

After every run its model is scored (Dice per structure and the mean) on the pinned test cases
(``test``), on the starting student's training cases (``original``: what fine-tuning may
forget) and on the cases added so far (``added``). OUT/scores.csv gets one row per turn,
variant, group and structure (turn 0: the starting student, under each variant), OUT/table.md
the mean Dice per turn. Everything is resumable: a finished run is not trained again, a
stopped one resumes, a scored one is not scored again, and OUT/plan.json keeps the split and
the order of the cases (another plan in OUT is refused).

Defaults: a fresh run's schedule of 12 epochs, which the recipe cuts to 3 (its minimum), and
a first student of 20 epochs on 4 cases; the evidence cohort (``mtkd synth
runs/kd-evidence/cohort --style ct --subjects 32 --seed 0 --difficulty 0.3``, written when
missing) and its 2-D teacher of split seed 0; the student S1 (``thesis_s1``) on the teacher's
64 x 64 slices, batch 16, learning rate 0.01 as in ``bench/kd_evidence/s1.yaml``; the
recommended distillation recipe (Hinton's KD per voxel).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: MTKDLib and mtkd from here
    sys.path.insert(0, str(ROOT))

from mtkd.cli import main as mtkd_main  # noqa: E402
from mtkd.config import RunConfig  # noqa: E402
from mtkd.data.atomic import atomic_write_bytes  # noqa: E402
from mtkd.data.datasets import load_dataset  # noqa: E402
from mtkd.engine.trainer import Trainer, resume_run  # noqa: E402
from mtkd.run_folder import FINISHED, STOPPED, RunDir  # noqa: E402
from MTKDLib.loop_recipe import FineTuneRecipe  # noqa: E402
from MTKDLib.loop_scores import score_versions  # noqa: E402
from MTKDLib.loop_split import pin_split  # noqa: E402
from MTKDLib.train_config import TrainingOptions, build_config  # noqa: E402

COHORT = "runs/kd-evidence/cohort"
SYNTH = ["--style", "ct", "--subjects", "32", "--seed", "0", "--difficulty", "0.3"]
TEACHER = "runs/kd-evidence/teachers/cohort/teacher2d-split0"
VARIANTS = ("plain", "anchor", "fresh")
FIELDS = ("turn", "variant", "group", "structure", "dice")
GROUPS = ("test", "original", "added")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="runs/loop-turns", help="results folder")
    parser.add_argument("--cohort", default=COHORT, help="MSD cohort folder")
    parser.add_argument("--teacher", default=TEACHER, help="the loop's teacher (run folder)")
    parser.add_argument("--turns", type=int, default=10, help="cases added, one per turn")
    parser.add_argument("--start-cases", type=int, default=4, help="the first student's cases")
    parser.add_argument("--start-model", help="a given first student instead of training one "
                        "(then 'original' still scores the plan's starting cases)")  # fmt: skip
    parser.add_argument("--start-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=12, help="a fresh run's; the recipe "
                        "fine-tunes for a quarter of them (at least 3)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=0.01, help="a fresh run's learning rate")
    parser.add_argument("--lr-factor", type=float, default=FineTuneRecipe.lr_factor)
    parser.add_argument("--anchor-weight", type=float, default=FineTuneRecipe.anchor_weight)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variants", default="plain,anchor", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0, help="case order, split and training")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        parser.error(f"--variants: choose among {', '.join(VARIANTS)} (got {args.variants})")
    if args.turns < 1 or args.start_cases < 1:
        parser.error("--turns and --start-cases are at least 1")
    return args


def recipes(args: argparse.Namespace) -> dict[str, FineTuneRecipe]:
    """Each variant's fine-tuning recipe."""
    loop = FineTuneRecipe(lr_factor=args.lr_factor, anchor_weight=args.anchor_weight)
    return {
        "plain": loop,
        "anchor": dataclasses.replace(loop, anchor=True),
        "fresh": FineTuneRecipe(lr_factor=1.0, epochs_factor=1.0, patience=None),
    }


def ensure_cohort(cohort: Path) -> None:
    """Write the evidence cohort where it is missing (the default folder only)."""
    if (cohort / "dataset.json").is_file():
        return
    if cohort != Path(COHORT):
        raise SystemExit(f"{cohort}: no dataset.json (not an MSD cohort folder)")
    print(f"writing the evidence cohort to {cohort}", flush=True)
    if mtkd_main(["synth", str(cohort), *SYNTH]) != 0:
        raise SystemExit(f"{cohort}: the cohort could not be written")


def make_plan(args: argparse.Namespace, cohort: Path, teacher: Path) -> dict[str, Any]:
    """The pinned validation and test cases, the starting cases and the cases added per turn."""
    patients = {case.case_id: case.patient_id for case in load_dataset(cohort).cases}
    val, test = teacher_split(teacher, patients)
    pinned = pin_split(patients, val, test, args.seed)
    held = set(pinned["val"]) | set(pinned["test"])
    pool = sorted(case for case in patients if case not in held)
    random.Random(args.seed).shuffle(pool)
    needed = args.start_cases + args.turns
    if len(pool) < needed:
        raise SystemExit(f"{cohort}: {len(pool)} training cases, {needed} needed")
    return {"cohort": str(cohort.resolve()), "teacher": str(teacher.resolve()),
            "val": pinned["val"], "test": pinned["test"], "start": pool[: args.start_cases],
            "added": pool[args.start_cases : needed]}  # fmt: skip


def teacher_split(teacher: Path, patients: dict[str, str]) -> tuple[list | None, list | None]:
    """The teacher's validation and test cases when its split is of this cohort, else None."""
    path = RunDir(teacher).split
    if not path.is_file():
        return None, None
    split = json.loads(path.read_text(encoding="utf-8"))
    cases = set(split.get("val", [])) | set(split.get("test", []))
    if not split.get("test") or not cases <= set(patients):
        return None, None
    return list(split.get("val", [])), list(split["test"])


def stored_plan(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """The plan kept in OUT/plan.json; refused when it differs from this one."""
    path = out / "plan.json"
    if path.is_file():
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept != plan:
            raise SystemExit(f"{path}: this folder holds another plan (cohort, teacher, split "
                             "or cases); use another folder or delete it")  # fmt: skip
        return kept
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(plan, indent=2) + "\n").encode("utf-8"))
    return plan


def options(args: argparse.Namespace, plan: dict[str, Any], train: list[str]) -> TrainingOptions:
    """The panel's options for a run on ``train`` (every one of them trained on)."""
    split = {"train": list(train), "val": plan["val"], "test": plan["test"],
             "student_train": list(train)}  # fmt: skip
    return TrainingOptions(dataset=plan["cohort"], teacher=plan["teacher"], name="loop",
                           student="thesis_s1", epochs=args.epochs, batch_size=args.batch_size,
                           learning_rate=args.lr, student_fraction=1.0, device=args.device,
                           seed=args.seed, split=split)  # fmt: skip


def train(config: dict[str, Any], run_dir: Path) -> float:
    """Train, resume or skip the run in ``run_dir``; the seconds it took here."""
    started = time.perf_counter()
    config = RunConfig.from_dict(config)
    folder = RunDir(run_dir)
    folder.check_holds(config, "delete it to run this turn afresh")
    if folder.state == FINISHED:
        return 0.0
    if folder.state == STOPPED:
        resume_run(run_dir, progress=False)
    else:
        Trainer(config, run_dir, progress=False).run()
    return time.perf_counter() - started


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode("utf-8"))


def score(model: Path, plan: dict[str, Any], added: list[str], device: str) -> list[tuple]:
    """(group, structure, Dice) of ``model`` on the test, original and added cases."""
    groups = {"test": plan["test"], "original": plan["start"], "added": added}
    scores = score_versions(Path(plan["cohort"]), {"model": model}, groups, device)["model"]
    return [(group, structure, dice) for group in GROUPS
            for structure, dice in scores.get(group, {}).items()]  # fmt: skip


def record(out: Path, rows: list[dict], turn: int, variants: list[str], scored: list[tuple]):
    """Add ``scored`` to the rows of each of ``variants`` at ``turn`` and write scores.csv."""
    for variant in variants:
        rows += [{"turn": turn, "variant": variant, "group": group, "structure": structure,
                  "dice": f"{dice:.6f}"} for group, structure, dice in scored]  # fmt: skip
    write_rows(out / "scores.csv", rows)


def done(rows: list[dict], turn: int, variant: str) -> bool:
    return any(int(r["turn"]) == turn and r["variant"] == variant for r in rows)


def start_model(args: argparse.Namespace, plan: dict[str, Any], out: Path) -> Path:
    """The first student: ``--start-model``, else trained on the starting cases."""
    if args.start_model:
        return Path(args.start_model).resolve()
    first = dataclasses.replace(options(args, plan, plan["start"]), epochs=args.start_epochs)
    seconds = train(build_config(first), out / "start")
    print(f"start: {len(plan['start'])} cases, {seconds:.0f} s", flush=True)
    return out / "start" / "model"


def run_turns(args: argparse.Namespace, plan: dict[str, Any], out: Path) -> list[dict]:
    """Every turn of every variant, trained and scored (what is done already skipped)."""
    rows = read_rows(out / "scores.csv")
    first = start_model(args, plan, out)
    todo = [v for v in args.variants if not done(rows, 0, v)]
    if todo:
        record(out, rows, 0, todo, score(first, plan, [], args.device))
    chosen = recipes(args)
    parents = {variant: first for variant in args.variants}
    for turn in range(1, args.turns + 1):
        added = plan["added"][:turn]
        train_cases = plan["start"] + added
        for variant in args.variants:  # each fine-tunes its own previous version
            fine_tune = chosen[variant].apply(
                options(args, plan, train_cases), parents[variant], validation=bool(plan["val"])
            )
            run_dir = out / variant / f"turn{turn:02d}"
            config = build_config(dataclasses.replace(fine_tune, name=f"{variant}-turn{turn}"))
            seconds = train(config, run_dir)
            parents[variant] = run_dir / "model"
            if not done(rows, turn, variant):
                record(out, rows, turn, [variant], score(parents[variant], plan, added,
                                                         args.device))  # fmt: skip
            print(f"{variant} turn {turn}: {len(train_cases)} cases, trained in {seconds:.0f} s",
                  flush=True)  # fmt: skip
    return rows


def table(rows: list[dict], variants: list[str], start_cases: int) -> str:
    """The mean Dice per turn, group and variant, as Markdown."""
    means = {(int(r["turn"]), r["variant"], r["group"]): float(r["dice"])
             for r in rows if r["structure"] == "mean"}  # fmt: skip
    turns = sorted({turn for turn, _, _ in means})
    header = ["turn", "cases"] + [f"{g} {v}" for g in GROUPS for v in variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for turn in turns:
        cells = [str(turn), str(start_cases + turn)]
        for group in GROUPS:
            cells += [_cell(means.get((turn, variant, group))) for variant in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cohort, out = Path(args.cohort), Path(args.out).resolve()
    ensure_cohort(cohort)
    teacher = Path(args.teacher)
    if not RunDir(teacher).model_metadata.is_file() and not (teacher / "mtkd_model.json").is_file():
        raise SystemExit(f"{teacher}: not a trained teacher (run or model folder)")
    plan = stored_plan(out, make_plan(args, cohort, teacher))
    rows = run_turns(args, plan, out)
    text = (f"Mean Dice per turn (test: the pinned test cases; original: the first student's "
            f"{len(plan['start'])} cases; added: the cases added so far).\n\n"
            + table(rows, args.variants, len(plan["start"])))  # fmt: skip
    atomic_write_bytes(out / "table.md", text.encode("utf-8"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
