"""Paired per-case differences against a reference cell and their bootstrap interval (numpy).

Input rows are ``runs.csv`` rows: mappings with ``cell, split_seed, seed, case, structure`` and
a score (``dice``). A difference is paired on (split_seed, seed, case, structure): the cell's
score minus the reference's (``no_kd``) for the same run seed, split and test case; the
structures of a case are then averaged (those finite in both), giving one difference per
(split_seed, seed, case).

The interval is a percentile bootstrap, stratified by split seed, two-way within each split
seed. For split seed k the differences form a matrix D_k (seeds x cases; the test cases of a
split are the same for every seed, so seeds and cases are crossed). One bootstrap replicate
draws, independently for every split seed, the seeds with replacement (as many as there are)
and the cases with replacement (as many as there are), and takes the mean of D_k over the
drawn seed x case cells (each drawn seed with every drawn case, repeats counted; missing
pairs left out); the replicate's statistic is the mean of these over split seeds. Split seeds
are strata, not resampled (there are too few of them). The point estimate is the same
statistic without resampling. ``ci95`` is the 2.5th and 97.5th percentiles over the
replicates (numpy's default linear interpolation), from ``numpy.random.default_rng(seed)``:
the same rows and seed give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_REPLICATES = 10_000
DEFAULT_SEED = 0


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def case_means(
    rows: Iterable[Mapping[str, Any]], cell: str, metric: str = "dice"
) -> dict[tuple[int, int, str], float]:
    """(split_seed, seed, case) -> mean over structures (finite ones) of ``cell``'s
    ``metric``; keys without a finite score are left out."""
    by_case: dict[tuple[int, int, str], list[float]] = {}
    for row in rows:
        value = _number(row[metric])
        if row["cell"] == cell and math.isfinite(value):
            key = (int(row["split_seed"]), int(row["seed"]), str(row["case"]))
            by_case.setdefault(key, []).append(value)
    return {key: float(np.mean(values)) for key, values in sorted(by_case.items())}


def case_differences(
    rows: Iterable[Mapping[str, Any]], cell: str, reference: str, metric: str = "dice"
) -> dict[tuple[int, int, str], float]:
    """(split_seed, seed, case) -> mean over structures of ``cell``'s ``metric`` minus
    ``reference``'s, paired on (split_seed, seed, case, structure); keys where no structure has
    a finite score in both are left out."""
    scores: dict[str, dict[tuple[int, int, str, str], float]] = {cell: {}, reference: {}}
    for row in rows:
        if row["cell"] in scores:
            key = (int(row["split_seed"]), int(row["seed"]), str(row["case"]), row["structure"])
            scores[row["cell"]][key] = _number(row[metric])
    by_case: dict[tuple[int, int, str], list[float]] = {}
    for key, value in scores[cell].items():
        other = scores[reference].get(key, math.nan)
        if math.isfinite(value) and math.isfinite(other):
            by_case.setdefault(key[:3], []).append(value - other)
    return {key: float(np.mean(values)) for key, values in sorted(by_case.items())}


def split_matrices(
    differences: Mapping[tuple[int, int, str], float],
) -> dict[int, np.ndarray]:
    """split_seed -> matrix (seeds x cases) of the values, NaN where one is missing."""
    matrices: dict[int, np.ndarray] = {}
    for split in sorted({key[0] for key in differences}):
        own = {key[1:]: value for key, value in differences.items() if key[0] == split}
        seeds = sorted({seed for seed, _ in own})
        cases = sorted({case for _, case in own})
        matrix = np.full((len(seeds), len(cases)), np.nan)
        for (seed, case), value in own.items():
            matrix[seeds.index(seed), cases.index(case)] = value
        matrices[split] = matrix
    return matrices


def _weighted_means(matrix: np.ndarray, seed_counts: np.ndarray, case_counts: np.ndarray):
    """Per replicate b: sum_ij w_bi v_bj D_ij / sum_ij w_bi v_bj over the finite D_ij.
    ``seed_counts`` (B, S) and ``case_counts`` (B, C) are how often each seed / case was drawn."""
    present = np.isfinite(matrix)
    values = np.where(present, matrix, 0.0)
    total = np.sum((seed_counts @ values) * case_counts, axis=1)
    weight = np.sum((seed_counts @ present.astype(float)) * case_counts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / weight  # NaN where a replicate drew only missing pairs


def _draw_counts(rng: np.random.Generator, replicates: int, size: int) -> np.ndarray:
    """(replicates, size): how often each of ``size`` items is drawn in ``size`` draws with
    replacement."""
    return rng.multinomial(size, np.full(size, 1.0 / size), size=replicates).astype(float)


def bootstrap_replicates(
    matrices: Mapping[int, np.ndarray],
    replicates: int = DEFAULT_REPLICATES,
    seed: int = DEFAULT_SEED,
) -> np.ndarray:
    """(replicates,) bootstrap statistics of the module's scheme."""
    rng = np.random.default_rng(seed)
    per_split = []
    for split in sorted(matrices):
        matrix = matrices[split]
        seed_counts = _draw_counts(rng, replicates, matrix.shape[0])
        case_counts = _draw_counts(rng, replicates, matrix.shape[1])
        per_split.append(_weighted_means(matrix, seed_counts, case_counts))
    if not per_split:
        return np.array([])
    stacked = np.stack(per_split)
    finite = np.isfinite(stacked)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN where no split seed has one
        return np.where(finite, stacked, 0.0).sum(axis=0) / finite.sum(axis=0)


def stratified_mean(values: Mapping[tuple[int, int, str], float]) -> float:
    """Mean over split seeds of the mean of each split seed's (seed, case) values."""
    return point_estimate(split_matrices(values))


def point_estimate(matrices: Mapping[int, np.ndarray]) -> float:
    """Mean over split seeds of the mean of each split seed's differences."""
    means = [float(np.nanmean(m)) for m in matrices.values() if np.isfinite(m).any()]
    return float(np.mean(means)) if means else math.nan


@dataclass
class PairedDifference:
    mean: float
    ci95: tuple[float, float]
    pairs: int  # (split_seed, seed, case) differences
    split_seeds: int


def paired_difference(
    rows: Iterable[Mapping[str, Any]],
    cell: str,
    reference: str,
    metric: str = "dice",
    *,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = DEFAULT_SEED,
) -> PairedDifference:
    """Mean paired difference of ``cell`` against ``reference`` and its 95 % bootstrap interval
    (NaN when no pair exists)."""
    differences = case_differences(rows, cell, reference, metric)
    matrices = split_matrices(differences)
    if not differences:
        return PairedDifference(math.nan, (math.nan, math.nan), 0, 0)
    statistics = bootstrap_replicates(matrices, replicates, seed)
    statistics = statistics[np.isfinite(statistics)]
    low, high = np.percentile(statistics, [2.5, 97.5])
    return PairedDifference(
        point_estimate(matrices), (float(low), float(high)), len(differences), len(matrices)
    )
