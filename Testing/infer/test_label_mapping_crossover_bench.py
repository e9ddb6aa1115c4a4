"""bench/label_mapping_crossover.py on two thin maps: both paths timed, border shares that
grow as the logits' grid gets finer, and the module's threshold left as it was."""

from __future__ import annotations

import json
import sys

from helpers import load_bench_script

from mtkd.infer import label_mapping


def test_the_crossover_bench_times_both_paths(tmp_path, monkeypatch):
    bench = load_bench_script("label_mapping_crossover.py", "label_mapping_crossover_bench")
    out = tmp_path / "crossover.json"
    argv = ["x", "--threads", "1", "--repeats", "1", "--slices", "2", "--coarse", "64", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    threshold = label_mapping.DENSE_ABOVE
    bench.main()
    assert threshold == label_mapping.DENSE_ABOVE
    rows = json.loads(out.read_text())["rows"]
    assert [row["coarse"] for row in rows] == [64, 4]
    assert rows[0]["border_share"] < rows[1]["border_share"]
    assert all(row["sparse"] > 0 and row["dense"] > 0 for row in rows)
