"""The ablation's tables and plots: one row per run (``results.csv``), one per cell with the
mean and the sample standard deviation over seeds (``summary.csv``, ``summary.md``), a bar chart
with error bars and the training curves (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtkd.ablation.grid import KD, NO_KD, TEACHER
from mtkd.data.atomic import atomic_path, atomic_write_bytes

RESULT_FIELDS = [
    "cell",
    "role",
    "method",
    "split_seed",
    "seed",
    "pairs",
    "feature_loss",
    "output_loss",
    "parameters",
    "dice",
    "hd95_mm",
    "missed",
    "spurious",
    "best_val_dice",
    "val_dice",
    "best_epoch",
    "epochs",
    "train_seconds",
    "run",
]
SUMMARY_FIELDS = [
    "cell",
    "role",
    "pairs",
    "feature_loss",
    "output_loss",
    "parameters",
    "seeds",
    "dice_mean",
    "dice_std",
    "hd95_mm_mean",
    "hd95_mm_std",
    "hd95_mm_runs",
    "missed_mean",
    "spurious_mean",
    "dice_share_of_teacher",
]
ROLE_TEXT = {TEACHER: "**teacher**", NO_KD: "**no KD**", KD: "KD"}
ROLE_COLOR = {TEACHER: "#7f7f7f", NO_KD: "#ff7f0e", KD: "#1f77b4"}


def finite(values: list[Any]) -> list[float]:
    return [
        float(v)
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]


def mean_std(values: list[Any]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of the finite values; NaN where undefined."""
    numbers = finite(values)
    mean = float(np.mean(numbers)) if numbers else math.nan
    std = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else math.nan
    return mean, std


def pairs_text(pairs: list[str]) -> str:
    return "+".join(pairs)


def result_rows(results: list[dict[str, Any]], structures: list[str]) -> list[dict[str, Any]]:
    """``results.csv`` rows: the run results flattened, per-structure columns last."""
    rows = []
    for result in results:
        row = {key: result.get(key) for key in RESULT_FIELDS}
        row["pairs"] = pairs_text(result.get("pairs") or [])
        for name in structures:
            scores = (result.get("per_structure") or {}).get(name, {})
            row[f"dice_{name}"] = scores.get("dice")
            row[f"hd95_mm_{name}"] = scores.get("hd95_mm")
        rows.append(row)
    return rows


def summarise_cells(results: list[dict[str, Any]], structures: list[str]) -> list[dict[str, Any]]:
    """One row per cell (in the order of ``results``): mean and std over its seeds."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        cells.setdefault(result["cell"], []).append(result)
    teacher = cells.get(TEACHER)
    teacher_dice = mean_std([r["dice"] for r in teacher])[0] if teacher else math.nan
    summary = []
    for name, runs in cells.items():
        first = runs[0]
        dice, dice_std = mean_std([r["dice"] for r in runs])
        hd95, hd95_std = mean_std([r["hd95_mm"] for r in runs])
        share = dice / teacher_dice if teacher_dice and math.isfinite(teacher_dice) else math.nan
        row = {
            "cell": name,
            "role": first["role"],
            "pairs": pairs_text(first.get("pairs") or []),
            "feature_loss": first.get("feature_loss") or "",
            "output_loss": first.get("output_loss") or "",
            "parameters": first.get("parameters"),
            "seeds": len(runs),
            "dice_mean": dice,
            "dice_std": dice_std,
            "hd95_mm_mean": hd95,
            "hd95_mm_std": hd95_std,
            # runs with an HD95 (none where no test volume nor prediction has any structure)
            "hd95_mm_runs": len(finite([r["hd95_mm"] for r in runs])),
            # structure-volumes per run scored with the penalty HD95 (mean over seeds)
            "missed_mean": mean_std([r.get("missed") for r in runs])[0],
            "spurious_mean": mean_std([r.get("spurious") for r in runs])[0],
            "dice_share_of_teacher": share,
        }
        for structure in structures:
            values = [(r.get("per_structure") or {}).get(structure, {}) for r in runs]
            row[f"dice_{structure}_mean"] = mean_std([v.get("dice") for v in values])[0]
        summary.append(row)
    return summary


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str] | None = None) -> None:
    """Rows (mappings with the same keys) as CSV, written atomically; ``fields``: the
    columns (default: the first row's keys); an empty ``rows`` writes the header only."""
    buffer = io.StringIO()
    header = fields if fields is not None else (list(rows[0]) if rows else [])
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_value(row.get(key)) for key in header])
    atomic_write_bytes(path, buffer.getvalue().encode())


def _score(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean:.{digits}f}"
    return text if not math.isfinite(std) else f"{text} ± {std:.{digits}f}"


def _count(value: float) -> str:
    """A mean count: whole numbers without decimals, others with one."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _missed(missed: float, spurious: float) -> str:
    if not math.isfinite(missed):
        return "n/a"
    extra = f" +{_count(spurious)} spurious" if math.isfinite(spurious) and spurious else ""
    return _count(missed) + extra


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The per-cell table in Markdown (mean ± std over seeds)."""
    header = [
        "cell",
        "role",
        "pairs",
        "feature loss",
        "output loss",
        "parameters",
        "seeds",
        "Dice",
        "HD95 (mm)",
        "missed",
        "Dice / teacher",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        parameters = row["parameters"]
        share = row["dice_share_of_teacher"]
        runs, seeds = row["hd95_mm_runs"], row["seeds"]
        fewer = "" if runs in (0, seeds) else f" ({runs} of {seeds} runs)"
        cells = [
            row["cell"],
            ROLE_TEXT.get(row["role"], row["role"]),
            row["pairs"] or "–",
            row["feature_loss"] or "–",
            row["output_loss"] or "–",
            f"{parameters:,}" if isinstance(parameters, int) else "n/a",
            str(row["seeds"]),
            _score(row["dice_mean"], row["dice_std"], 3),
            _score(row["hd95_mm_mean"], row["hd95_mm_std"], 2) + fewer,
            _missed(row["missed_mean"], row["spurious_mean"]),
            f"{share:.3f}" if math.isfinite(share) else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(
    name: str,
    summary: list[dict[str, Any]],
    *,
    test_cases: list[str],
    structures: list[str],
    seeds: list[int],
    epochs: int,
    split_seeds: list[int] | None = None,
) -> str:
    """``summary.md``: a title, what the numbers are, and the table. ``split_seeds``: the
    grid's (None: one split, its test cases ``test_cases``)."""
    if split_seeds is None:
        over = f"the seeds ({', '.join(map(str, seeds))})"
        same = "Every cell has the same data, split, recipe and epochs"
        teacher = "The teacher is one fixed model."
    else:
        over = (
            f"the runs (seeds {', '.join(map(str, seeds))} x split seeds "
            f"{', '.join(map(str, split_seeds))}; each split seed its own test cases)"
        )
        same = "Every cell has the same data, splits, recipe and epochs"
        teacher = "The teacher is one fixed model per split seed."
    return (
        f"# Ablation: {name}\n\n"
        f"Per-volume Dice and HD95 (mm) on the {len(test_cases)} test case(s) "
        f"({', '.join(test_cases)}), averaged over the structures ({', '.join(structures)}); "
        f"mean ± sample standard deviation over {over}. "
        f"{same} ({epochs}); the seed varies "
        f"initialisation, data order and augmentation. {teacher} "
        "A structure that a model leaves empty in a test volume (missed) counts in HD95 as the "
        "image's diagonal in mm, and so does one it labels where the reference has none "
        '(spurious); "missed": missed structure-volumes per run, mean over seeds, of '
        f'{len(test_cases) * len(structures)} ("+k spurious" where there are any); '
        '"(k runs)" marks a mean over fewer runs than seeds.\n\n'
        f"{markdown_table(summary)}\n"
    )


# ------------------------------------------------------------------------------ plots
def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return FigureCanvasAgg, Figure


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


def mean_curve(histories: list[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float]]:
    """Epochs and the mean over runs of ``key`` at each epoch (runs lacking it are skipped)."""
    by_epoch: dict[int, list[float]] = {}
    for history in histories:
        for record in history:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_epoch.setdefault(int(record["epoch"]), []).append(float(value))
    epochs = sorted(by_epoch)
    return epochs, [float(np.mean(by_epoch[e])) for e in epochs]


def write_plots(
    folder: Path,
    summary: list[dict[str, Any]],
    histories: dict[str, list[list[dict[str, Any]]]],
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """``dice.png`` (Dice and HD95 per cell, error bars: std over seeds) and ``curves.png``
    (validation Dice and training loss per epoch, mean over seeds, one line per cell).
    Without matplotlib the plots are skipped with a notice."""
    classes = _matplotlib()
    if classes is None:
        log("plots skipped: matplotlib is not installed (pip install 'mtkd[plot]')")
        return {}
    canvas_class, figure_class = classes
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"dice": _bar_chart(canvas_class, figure_class, folder / "dice.png", summary)}
    paths["curves"] = _curves(canvas_class, figure_class, folder / "curves.png", histories)
    return paths


def _bar_chart(canvas_class, figure_class, path: Path, summary: list[dict[str, Any]]) -> Path:
    names = [row["cell"] for row in summary]
    width = max(6.0, 0.55 * len(names) + 3.0)
    figure = figure_class(figsize=(width, 7.5), dpi=100)
    canvas_class(figure)
    axes = figure.subplots(2, 1, sharex=True)
    colors = [ROLE_COLOR.get(row["role"], ROLE_COLOR[KD]) for row in summary]
    x = np.arange(len(names))
    for ax, key, label in ((axes[0], "dice", "Dice"), (axes[1], "hd95_mm", "HD95 (mm)")):
        means = [row[f"{key}_mean"] for row in summary]
        errors = [row[f"{key}_std"] for row in summary]
        bars = ax.bar(
            x,
            [m if math.isfinite(m) else 0.0 for m in means],
            yerr=[e if math.isfinite(e) else 0.0 for e in errors],
            color=colors,
            capsize=4,
        )
        digits = 3 if key == "dice" else 1
        labels = [f"{m:.{digits}f}" if math.isfinite(m) else "n/a" for m in means]
        if key == "hd95_mm":  # the missed count next to each mean HD95
            labels = [
                f"{text}\n{_missed(row['missed_mean'], row['spurious_mean'])} missed"
                for text, row in zip(labels, summary)
            ]
        ax.bar_label(bars, labels=labels, fontsize=7)
        ax.set_ylabel(f"{label}, test (mean ± std)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("Ablation: per-volume test scores; error bars: std over seeds")
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(names, rotation=35, ha="right")
    figure.tight_layout()
    return _save(figure, path)


CURVES = (
    ("val_dice", "validation Dice"),
    ("seg", "training segmentation loss"),
    ("loss", "training loss, all weighted terms"),
)


def _curves(
    canvas_class, figure_class, path: Path, histories: dict[str, list[list[dict[str, Any]]]]
) -> Path:
    from matplotlib.ticker import MaxNLocator

    figure = figure_class(figsize=(16, 4.8), dpi=100)
    canvas_class(figure)
    axes = figure.subplots(1, len(CURVES))
    for name, runs in histories.items():
        style = {"linestyle": "--", "color": "black"} if name == NO_KD else {}
        for ax, (key, _) in zip(axes, CURVES):
            epochs, values = mean_curve(runs, key)
            if epochs:
                ax.plot(epochs, values, marker="o", markersize=3, label=name, **style)
    for ax, (_, title) in zip(axes, CURVES):
        ax.set_title(f"{title} (mean over seeds)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if histories:
        axes[0].legend(fontsize=8, loc="best")
    figure.tight_layout()
    return _save(figure, path)
