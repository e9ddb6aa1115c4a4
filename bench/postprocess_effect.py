"""The effect of post-processing on Dice, HD95 and time, per structure, on validation and test.

    python bench/postprocess_effect.py DATASET OUT.csv --runs RUN [RUN ...] \
        [--subsets val test] [--labels-json NAMES.json] [--device cpu]
    python bench/postprocess_effect.py DATASET OUT.csv --summarise

OUT.csv.gz (any name ending in .gz) is written and read gzip-compressed.

Each RUN is a finished run folder (its model and its ``split.json``). Every case of the chosen
subsets of the run's split is segmented once; the label map is then scored as it is and after
each post-processing variant of :mod:`mtkd.infer.postprocess`:

- ``largest``: every structure keeps its largest connected part;
- ``min_1ml``: every structure drops its parts below 1 ml;
- ``largest_fill``: ``largest``, then the holes each structure encloses are filled.

OUT.csv has one row per run, subset, case, structure and variant: ``run,subset,case,
structure,variant,dice,hd95,outcome,seconds`` (``seconds``: the post-processing's own time on
that case; 0 for ``none``). The script prints for each model (a grid cell's runs together,
see :func:`group_of`), per variant and subset, the mean Dice and HD95
(with missed structures scored by the penalty, as ``mtkd evaluate``), and per structure the
change that ``largest`` makes; ``chosen`` applies ``largest`` to the structures whose
validation Dice it raises, the rule a model would adopt structure by structure, and reports its
effect on test. ``--summarise`` prints the same from an existing OUT.csv.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import re
import statistics
import sys
import time
from pathlib import Path

from mtkd.data.atomic import atomic_write_bytes
from mtkd.data.datasets import load_dataset
from mtkd.data.splits import read_split
from mtkd.devices import resolve_device
from mtkd.infer.evaluate import evaluate, score_arrays
from mtkd.infer.postprocess import PostProcessing, StructureRule
from mtkd.infer.predictor import Predictor
from mtkd.metrics import nanmean
from mtkd.modelfiles.model_io import load_model

FIELDS = ["run", "subset", "case", "structure", "variant", "dice", "hd95", "outcome", "seconds"]
VARIANTS = {
    "largest": StructureRule(largest_only=True),
    "min_1ml": StructureRule(min_volume_ml=1.0),
    "largest_fill": StructureRule(largest_only=True, fill_holes=True),
}


def score_run(run: Path, dataset, subsets: list[str], device) -> list[dict]:
    """Rows of one run: every case of its subsets, as predicted and after each variant."""
    model = load_model(run, device)
    split = read_split(run / "split.json", require=subsets)
    names = list(model.labels.names)
    rules = {
        variant: PostProcessing({value: rule for value in model.labels.label_values})
        for variant, rule in VARIANTS.items()
    }
    rows: list[dict] = []
    for subset in subsets:

        def on_arrays(case_id, predicted, reference, image, subset=subset) -> None:
            spacing = tuple(reversed(image.GetSpacing()))  # array axes are (z, y, x)
            variants = {"none": (predicted, 0.0)}
            for variant, postprocessing in rules.items():
                started = time.perf_counter()
                cleaned = postprocessing.apply(predicted, spacing)
                variants[variant] = (cleaned, time.perf_counter() - started)
            for variant, (labels, seconds) in variants.items():
                for score in score_arrays(case_id, labels, reference, names, spacing):
                    rows.append(
                        {
                            "run": run.as_posix(),
                            "subset": subset,
                            "case": case_id,
                            "structure": score.structure,
                            "variant": variant,
                            "dice": score.dice,
                            "hd95": score.hd95_mm,
                            "outcome": score.outcome,
                            "seconds": seconds,
                        }
                    )

        evaluate(Predictor(model, device), dataset, getattr(split, subset), on_arrays)
    return rows


def group_of(run: str) -> str:
    """The model a run stands for: its grid cell (``cells/<cell>/split<j>/seed<k>``) or its
    folder's name without ``-split<j>``."""
    parts = [part for part in Path(run).parts if not re.fullmatch(r"(split|seed)\d+", part)]
    return re.sub(r"-split\d+$", "", parts[-1])


def mean_over_cases(rows: list[dict], key: str) -> float:
    """The mean over runs and cases of the mean over structures of ``key``."""
    by_case: dict[tuple, list[float]] = {}
    for row in rows:
        by_case.setdefault((row["run"], row["case"]), []).append(float(row[key]))
    return statistics.fmean(nanmean(values) for values in by_case.values())


def structure_mean(rows: list[dict], variant: str, subset: str, structure: str, key: str):
    """The mean of ``key`` over the rows of one variant, subset and structure."""
    wanted = (variant, subset, structure)
    return nanmean(
        [float(r[key]) for r in rows if (r["variant"], r["subset"], r["structure"]) == wanted]
    )


def chosen_on_validation(rows: list[dict]) -> list[str]:
    """The structures whose mean validation Dice ``largest`` raises: the per-structure rule a
    model would adopt."""
    structures = dict.fromkeys(r["structure"] for r in rows)
    return [
        name
        for name in structures
        if structure_mean(rows, "largest", "val", name, "dice")
        > structure_mean(rows, "none", "val", name, "dice")
    ]


def summary(rows: list[dict], subsets: list[str]) -> str:
    """Markdown: mean Dice and HD95 per variant and subset (and of ``largest`` on the
    structures chosen on validation only), then ``largest`` per structure."""
    chosen = chosen_on_validation(rows) if "val" in subsets else []
    picked = [
        {**r, "variant": "chosen"}
        for r in rows
        if r["variant"] == ("largest" if r["structure"] in chosen else "none")
    ]
    lines = ["| variant | " + " | ".join(f"{s} Dice | {s} HD95 (mm)" for s in subsets) + " |"]
    lines.append("|---|" + "---|---|" * len(subsets))
    for variant in ["none", *VARIANTS, "chosen"]:
        cells = []
        for subset in subsets:
            own = [r for r in rows + picked if r["variant"] == variant and r["subset"] == subset]
            cells += [f"{mean_over_cases(own, 'dice'):.4f}", f"{mean_over_cases(own, 'hd95'):.1f}"]
        name = f"largest for {', '.join(chosen) or 'none'}" if variant == "chosen" else variant
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| structure | " + " | ".join(f"{s} ΔDice, ΔHD95 (largest)" for s in subsets)]
    lines[-1] += " | chosen (higher validation Dice) |"
    lines.append("|---|" + "---|" * len(subsets) + "---|")
    for structure in dict.fromkeys(r["structure"] for r in rows):
        cells = []
        for subset in subsets:
            dice, hd95 = (
                structure_mean(rows, "largest", subset, structure, key)
                - structure_mean(rows, "none", subset, structure, key)
                for key in ("dice", "hd95")
            )
            cells.append(f"{dice:+.4f}, {hd95:+.1f} mm")
        adopted = "yes" if structure in chosen else "no"
        lines.append(f"| {structure} | " + " | ".join(cells) + f" | {adopted} |")
    seconds = [float(r["seconds"]) * 1000 for r in rows if r["variant"] != "none"]
    median, longest = statistics.median(seconds), max(seconds)
    lines += [
        "",
        f"post-processing per case and variant: median {median:.1f} ms, max {longest:.1f} ms",
    ]
    return "\n".join(lines)


def print_summaries(rows: list[dict], subsets: list[str]) -> None:
    """The summary of each model (grid cell) apart."""
    for group in dict.fromkeys(group_of(row["run"]) for row in rows):
        own = [row for row in rows if group_of(row["run"]) == group]
        print(f"\n### {group} ({len({row['run'] for row in own})} runs)\n")
        print(summary(own, subsets))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="the runs' dataset folder")
    parser.add_argument("output", type=Path, help="the CSV to write")
    parser.add_argument("--runs", nargs="+", help="finished run folders")
    parser.add_argument(
        "--summarise",
        action="store_true",
        help="print the summary of an existing OUT.csv instead (nothing is segmented)",
    )
    parser.add_argument("--subsets", nargs="+", default=["val", "test"])
    parser.add_argument("--labels-json", help="label names when the dataset has none")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    compressed = args.output.suffix == ".gz"
    if args.summarise:
        opener = gzip.open if compressed else open
        with opener(args.output, "rt", encoding="utf-8") as handle:
            print_summaries(list(csv.DictReader(handle)), args.subsets)
        return 0
    if not args.runs:
        parser.error("--runs is needed unless --summarise")
    runs = [Path(run) for run in args.runs]
    missing = [str(run) for run in runs if not (run / "split.json").is_file()]
    if missing:
        print(f"not finished run folders (no split.json): {', '.join(missing)}", file=sys.stderr)
        return 2
    dataset = load_dataset(args.dataset, labels_json=args.labels_json)
    device = resolve_device(args.device)
    rows = [row for run in runs for row in score_run(run, dataset, args.subsets, device)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode()
    atomic_write_bytes(args.output, gzip.compress(data, mtime=0) if compressed else data)
    print_summaries(rows, args.subsets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
