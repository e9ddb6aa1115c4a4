"""bench/kd_evidence/partial_summary.py: the finished runs of a grid, each cell against no KD
and, with --against, one cell against every other, on the pairs both have."""

from __future__ import annotations

import csv

import pytest
from helpers import load_bench_script

from mtkd.ablation.evidence import RUNS_FIELDS


@pytest.fixture(scope="module")
def summary():
    return load_bench_script("kd_evidence/partial_summary.py", "partial_summary_bench")


def write_runs(path, offsets: dict[str, float], seeds: dict[str, list[int]]) -> None:
    """A runs.csv: each cell's Dice is its offset plus a per-case base, on its seeds."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUNS_FIELDS, lineterminator="\n")
        writer.writeheader()
        for cell, offset in offsets.items():
            for seed in seeds[cell]:
                for case in range(4):
                    base = 0.5 + 0.05 * case + 0.01 * seed
                    writer.writerow({"cell": cell, "split_seed": 0, "seed": seed,
                                     "case": f"c{case}", "structure": "liver",
                                     "dice": base + offset, "hd95": 5.0, "missed": 0})  # fmt: skip


def test_one_cell_against_every_other_on_shared_pairs(summary, tmp_path, capsys):
    runs = tmp_path / "runs.csv"
    offsets = {"no_kd": 0.0, "leader": 0.05, "cwd": 0.02}
    write_runs(runs, offsets, {"no_kd": [0, 1, 2], "leader": [0, 1, 2], "cwd": [0, 1]})
    summary.main([str(runs), "--against", "leader"])
    printed = capsys.readouterr().out
    assert "| leader | 0: 3 | 0.635 | +0.050 [+0.050, +0.050] (12) |" in printed  # 0.585 + 0.05
    assert "| no_kd | +0.050 [+0.050, +0.050] (12) |" in printed
    assert "| cwd | +0.030 [+0.030, +0.030] (8) |" in printed  # cwd's 2 seeds only
    with pytest.raises(SystemExit):
        summary.main([str(runs), "--against", "nonesuch"])
    assert "no runs of the cell 'nonesuch'" in capsys.readouterr().err
