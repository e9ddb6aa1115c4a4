"""Paired differences and their bootstrap interval (mtkd.ablation.stats), and the evidence
summary's choices (mtkd.ablation.evidence): cases with a known answer."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mtkd.ablation.evidence import (
    choose_sub_cells,
    evidence_markdown,
    evidence_summary,
    recommend,
    runs_rows,
)
from mtkd.ablation.stats import (
    bootstrap_replicates,
    case_differences,
    paired_difference,
    point_estimate,
    split_matrices,
)


def rows_of(cell, scores, structures=("liver", "spleen")):
    """runs.csv rows: ``scores[(split, seed, case)]`` is one Dice or a tuple per structure."""
    rows = []
    for (split, seed, case), value in scores.items():
        values = value if isinstance(value, tuple) else (value,) * len(structures)
        for structure, dice in zip(structures, values):
            rows.append(
                {
                    "cell": cell,
                    "split_seed": split,
                    "seed": seed,
                    "case": case,
                    "structure": structure,
                    "dice": dice,
                    "hd95": 1.0,
                    "missed": 0,
                }
            )
    return rows


def grid(splits=(0, 1), seeds=(0, 1, 2), cases=4):
    return [(k, s, f"k{k}c{c}") for k in splits for s in seeds for c in range(cases)]


def test_pairs_match_split_seed_case_and_structure_then_average_structures():
    base = {(0, 0, "a"): (0.5, 0.7), (0, 1, "a"): (0.6, 0.2), (1, 0, "b"): (0.4, math.nan)}
    other = {(0, 0, "a"): (0.6, 0.9), (0, 1, "a"): (0.6, 0.5), (1, 0, "b"): (0.1, 0.9)}
    other[(0, 2, "a")] = (0.9, 0.9)  # no no_kd run to pair with: left out
    rows = rows_of("no_kd", base) + rows_of("cwd", other)
    differences = case_differences(rows, "cwd", "no_kd")
    assert differences == pytest.approx(
        {(0, 0, "a"): 0.15, (0, 1, "a"): 0.15, (1, 0, "b"): -0.3}  # NaN structure left out
    )
    matrices = split_matrices(differences)
    assert matrices[0].shape == (2, 1) and matrices[1].shape == (1, 1)
    assert point_estimate(matrices) == pytest.approx((0.15 - 0.3) / 2)


def test_a_constant_difference_gives_a_zero_width_interval_at_it():
    keys = grid()
    rng = np.random.default_rng(1)
    base = {key: float(rng.uniform(0.3, 0.8)) for key in keys}
    rows = rows_of("no_kd", base) + rows_of("dist", {k: v + 0.04 for k, v in base.items()})
    result = paired_difference(rows, "dist", "no_kd", replicates=2000)
    assert result.mean == pytest.approx(0.04, abs=1e-12)
    assert result.ci95 == pytest.approx((0.04, 0.04), abs=1e-12)
    assert result.pairs == len(keys) and result.split_seeds == 2


def symmetric_noise_rows(cases, seed):
    keys = grid(seeds=range(5), cases=cases)
    rng = np.random.default_rng(seed)
    noise = rng.choice([-0.1, 0.1], size=len(keys))
    base = dict.fromkeys(keys, 0.5)
    other = {key: 0.5 + n for key, n in zip(keys, noise)}
    return rows_of("no_kd", base) + rows_of("kd", other)


def test_symmetric_noise_interval_covers_zero_and_shrinks_with_more_cases():
    widths = []
    for cases in (5, 80):
        result = paired_difference(symmetric_noise_rows(cases, 3), "kd", "no_kd", replicates=3000)
        low, high = result.ci95
        assert low < 0 < high
        assert low <= result.mean <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # 16x the cases: about a quarter of the width


def test_the_interval_is_deterministic_and_its_seed_matters():
    rows = symmetric_noise_rows(6, 0)
    first = paired_difference(rows, "kd", "no_kd", replicates=500, seed=7)
    assert paired_difference(rows, "kd", "no_kd", replicates=500, seed=7) == first
    assert paired_difference(rows, "kd", "no_kd", replicates=500, seed=8).ci95 != first.ci95


def test_the_bootstrap_matches_brute_force_enumeration():
    """One split seed, 2 seeds x 3 cases: every draw of seeds (2^2) and cases (3^3) is equally
    likely; the replicates take exactly the enumerated values with their frequencies, and the
    interval is the enumerated distribution's quantiles."""
    matrix = np.array([[0.1, -0.3, 0.5], [0.2, 0.0, -0.4]])
    exact: dict[float, float] = {}
    draws = list(itertools.product(range(2), repeat=2))
    case_draws = list(itertools.product(range(3), repeat=3))
    for seeds in draws:
        for cases in case_draws:
            value = round(float(matrix[np.ix_(seeds, cases)].mean()), 9)
            exact[value] = exact.get(value, 0.0) + 1 / (len(draws) * len(case_draws))
    replicates = bootstrap_replicates({0: matrix}, replicates=40_000, seed=5)
    values, counts = np.unique(np.round(replicates, 9), return_counts=True)
    assert set(values) <= set(exact)
    for value, count in zip(values, counts):
        assert count / len(replicates) == pytest.approx(exact[value], abs=0.01)
    support = np.array(sorted(exact))
    cumulative = np.cumsum([exact[v] for v in support])
    exact_low = support[np.searchsorted(cumulative, 0.025)]
    exact_high = support[np.searchsorted(cumulative, 0.975)]
    low, high = np.percentile(replicates, [2.5, 97.5])
    assert exact_low - 0.05 <= low <= exact_low + 0.05
    assert exact_high - 0.05 <= high <= exact_high + 0.05


def test_missing_pairs_are_left_out_of_the_bootstrap():
    matrix = np.array([[0.2, np.nan], [0.2, 0.2]])
    replicates = bootstrap_replicates({0: matrix}, replicates=200, seed=0)
    finite = replicates[np.isfinite(replicates)]
    assert len(finite) > 150 and np.allclose(finite, 0.2)


def result(cell, split, seed, val, test, method=None, role="kd"):
    cases = [
        {"case": f"c{c}", "structure": "liver", "dice": test, "hd95": 3.0, "missed": int(c == 0)}
        for c in range(3)
    ]
    return {
        "cell": cell,
        "method": method or cell,
        "role": role,
        "split_seed": split,
        "seed": seed,
        "val_dice": val,
        "dice": test,
        "cases": cases,
    }


def results_for(cells):
    """cells: (cell, method, val, test) -> a result per split seed 0, 1 and seed 0, 1."""
    return [
        result(cell, split, seed, val + 0.001 * seed, test, method)
        for cell, method, val, test in cells
        for split in (0, 1)
        for seed in (0, 1)
    ]


def test_recommendation_and_sub_cells_use_validation_not_test():
    """cwd[w=1] is best on validation, cwd[w=3] on test: the sweep reports w=1; dist is best on
    test but worst on validation: pmd, best on validation, is recommended."""
    results = results_for(
        [
            ("no_kd", None, 0.70, 0.60),
            ("cwd[output.weight=1]", "cwd", 0.80, 0.62),
            ("cwd[output.weight=3]", "cwd", 0.75, 0.90),
            ("dist", None, 0.65, 0.95),
            ("pmd", None, 0.85, 0.61),
        ]
    )
    choices = choose_sub_cells(results)
    assert choices["cwd"]["chosen"] == "cwd[output.weight=1]"
    assert choices["dist"]["sweep"] is None
    assert recommend(choices) == "pmd"
    summary = evidence_summary(
        results, student="s1", cohort="cohort", seeds=2, split_seeds=2, replicates=200
    )
    assert summary["recommended"] == "pmd"
    assert set(summary["cells"]) == {"no_kd", "cwd", "dist", "pmd"}
    cwd = summary["cells"]["cwd"]
    assert cwd["chosen"] == "cwd[output.weight=1]"
    assert cwd["dice"] == pytest.approx(0.62)
    assert cwd["diff_vs_nokd"]["mean"] == pytest.approx(0.02)
    assert cwd["diff_vs_nokd"]["ci95"] == pytest.approx([0.02, 0.02])
    assert set(cwd["sweep_val_dice"]) == {"cwd[output.weight=1]", "cwd[output.weight=3]"}
    assert summary["cells"]["no_kd"]["diff_vs_nokd"]["mean"] == 0
    assert summary["cells"]["dist"]["missed_per_run"] == 1
    assert "chosen" not in summary["cells"]["dist"]
    assert "**pmd** (recommended)" in evidence_markdown(summary)


def test_summary_json_schema_keys():
    results = results_for([("no_kd", None, 0.7, 0.6), ("cwd", None, 0.6, 0.7)])
    results.append(result("teacher", 0, None, 0.9, 0.9, role="teacher"))
    summary = evidence_summary(
        results, student="s1", cohort="c", seeds=2, split_seeds=2, replicates=100
    )
    assert {"student", "cohort", "seeds", "split_seeds", "recommended", "cells"} <= set(summary)
    assert (summary["student"], summary["seeds"], summary["split_seeds"]) == ("s1", 2, 2)
    for cell in summary["cells"].values():
        assert isinstance(cell["dice"], float)
        low, high = cell["diff_vs_nokd"]["ci95"]
        assert low <= cell["diff_vs_nokd"]["mean"] <= high
    assert summary["teacher"]["dice"] == pytest.approx(0.9)
    assert all(row["cell"] != "teacher" for row in runs_rows(results))
