"""The loop's turn-by-turn benchmark (``bench/loop_turns/run.py``, issue 17 part 7) at its
smallest: one turn on a tiny synthetic cohort with the tiny teacher, with and without the
anchor; its CSV, its resume, and another plan in the same folder refused."""

from __future__ import annotations

import csv
import json
import math

import pytest
from helpers import load_bench_script

from mtkd.cli import main as mtkd_main
from mtkd.run_folder import RunDir, read_events


def load_bench():
    return load_bench_script("loop_turns/run.py", "loop_turns_bench")


BENCH = load_bench()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six small synthetic CT phantoms (MSD layout): liver, spleen, kidneys and aorta."""
    folder = tmp_path_factory.mktemp("cohort") / "cohort"
    size = ["--size", "48", "40", "16", "--style", "ct", "--subjects", "6", "--seed", "0"]
    assert mtkd_main(["synth", str(folder), *size]) == 0
    return folder


def test_one_turn_with_and_without_the_anchor(cohort, teacher_run, tmp_path):
    out = tmp_path / "out"
    tiny = ["--turns", "1", "--start-cases", "1", "--start-epochs", "1", "--epochs", "1"]
    args = [str(out), "--cohort", str(cohort), "--teacher", str(teacher_run), *tiny,
            "--batch-size", "4"]  # fmt: skip
    assert BENCH.main(args) == 0
    with (out / "scores.csv").open(encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
    assert reader.fieldnames == ["turn", "variant", "group", "structure", "dice"]
    seen = {(row["turn"], row["variant"], row["group"]) for row in rows}
    assert seen == {("0", v, g) for v in ("plain", "anchor") for g in ("test", "original")} | {
        ("1", v, g) for v in ("plain", "anchor") for g in ("test", "original", "added")
    }
    structures = {row["structure"] for row in rows}
    assert {"liver", "spleen", "kidney_right", "mean"} == structures  # the teacher's structures
    assert all(math.isnan(float(r["dice"])) or 0 <= float(r["dice"]) <= 1 for r in rows)

    # the pinned split: the teacher's split is of another dataset, so a fifth each by seed
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    assert len(plan["val"]) == len(plan["test"]) == 1
    assert len(plan["start"]) == len(plan["added"]) == 1
    assert not set(plan["start"] + plan["added"]) & set(plan["val"] + plan["test"])
    # both variants fine-tune the first student with the loop's recipe; one anchored to it
    start = str(out / "start" / "model")
    for variant, anchored in (("plain", False), ("anchor", True)):
        run = out / variant / "turn01"
        config = RunDir(run).load_config()
        assert config.model.init_from == start
        assert (config.distill.anchor.model if config.distill.anchor else None) == (
            start if anchored else None
        )
        assert sorted(config.split.fixed["train"]) == sorted(plan["start"] + plan["added"])
        metrics = [e for e in read_events(run / "events.jsonl") if e["type"] == "metrics"]
        assert ("anchor" in metrics[-1]) is anchored
    assert "| turn | cases | test plain | test anchor |" in (out / "table.md").read_text()

    # resumable: nothing is trained or scored again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("model.pt")}
    scores = (out / "scores.csv").read_bytes()
    assert BENCH.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.pt")} == before
    assert (out / "scores.csv").read_bytes() == scores
    with pytest.raises(SystemExit, match="another plan"):
        BENCH.main([*args, "--seed", "1"])
