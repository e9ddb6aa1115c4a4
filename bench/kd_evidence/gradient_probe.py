"""Why do the feature terms not help? Their gradients on the student, against the labels'.

    python bench/kd_evidence/gradient_probe.py GRID OUT.json --cells paper supcon \
        [--data COHORT] [--teacher RUN] [--split-seed 0] [--seed 0] [--batches 24] \
        [--trained RUN]

For each cell of the evidence grid GRID (``bench/kd_evidence/s1.yaml`` and the like), the run
of that cell at one split seed and seed is set up exactly as ``mtkd ablate`` would (data,
split, student, teacher, connectors), and on ``--batches`` training batches the gradient of
each weighted loss term on the student's weights is taken: the segmentation loss, each tap
pair's feature term and the output term. For every term the script reports, as the mean and
standard deviation over the batches:

- ``norm_ratio``: the term's gradient norm over the segmentation loss's (how loud it is);
- ``cos_seg``: the cosine between the term's gradient and the segmentation loss's (above 0:
  a step on the term also lowers the labels' loss; below 0: it works against them);
- ``cos_output``: the cosine with the output term's gradient, where the cell has one.

It does so twice: for the student at its random initialisation, where training starts, and,
with ``--trained RUN`` (a finished run folder of the same student, e.g. the grid's ``no_kd``
run), for those trained weights, where a converged student ends. The connectors are new at
initialisation (as at the start of a distillation); for the trained weights they are first
fitted to the frozen student on the feature terms (``--fit-connectors`` batches), as they
would be after distilling for a while. A term at weight 0 is left out. First-order only: the
figures say which way each term pushes, not how far training goes along it.

OUT.json holds every figure; the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtkd.ablation.grid_config import load_ablation
from mtkd.config import RunConfig
from mtkd.data.atomic import atomic_write_bytes
from mtkd.devices import resolve_device, seed_everything
from mtkd.engine.distributed import Distributed
from mtkd.engine.setup_data import build_run_data
from mtkd.engine.setup_models import build_run_models
from mtkd.engine.setup_optim import build_optimisation
from mtkd.engine.step import labelled_seg_loss
from mtkd.errors import MTKDError
from mtkd.infer.inference import repeat_channels
from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.run_folder import EventLog, RunDir

SEG = "seg"


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """The set-up's log, silenced."""


def term_gradients(
    batch: dict[str, torch.Tensor], step: Any, distiller: Any, in_channels: int
) -> dict[str, torch.Tensor]:
    """Each weighted term's gradient on the student's weights for one batch, flattened (P,)."""
    device = next(distiller.student.parameters()).device
    images = repeat_channels(batch["image"], in_channels).to(device)
    labels = batch["label"].to(device)
    has_label = batch["has_label"].to(device) if "has_label" in batch else None
    subject = batch["subject"].to(device) if "subject" in batch else None
    out = distiller(images, None, labels=labels, subject=subject)
    weighted = {SEG: step.seg_weight * labelled_seg_loss(step.seg_loss, out.student_logits,
                                                         labels, has_label)}  # fmt: skip
    weights = term_weights(distiller)
    for name, value in out.terms.items():
        if weights[name]:  # a term at weight 0 is not in the loss
            weighted[name] = weights[name] * value
    parameters = [p for p in distiller.student.parameters() if p.requires_grad]
    gradients = {}
    for name, value in weighted.items():
        grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
        gradients[name] = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).flatten()
                for g, p in zip(grads, parameters)
            ]  # fmt: skip
        )
    return gradients


def term_weights(distiller: Any) -> dict[str, float]:
    """The weight of each of the distiller's terms, by name."""
    weights = {label: pair.weight for label, pair in zip(distiller.labels, distiller.pairs)}
    if distiller.output is not None:
        weights[distiller.output.loss] = distiller.output.weight
    return weights


def fit_connectors(
    distiller: Any, loader: DataLoader, steps: int, lr: float, in_channels: int
) -> None:
    """Train the connectors alone (the student unchanged) on the weighted feature terms for
    ``steps`` batches, so that a trained student is probed through connectors fitted to it,
    as they would be after distilling for a while, not through random ones."""
    parameters = list(distiller.connectors.parameters())
    if not steps or not parameters:
        return
    device = parameters[0].device
    weights = term_weights(distiller)
    output = distiller.output.loss if distiller.output is not None else None
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    student = [p for p in distiller.student.parameters() if p.requires_grad]
    kept = {key: value.clone() for key, value in distiller.student.state_dict().items()}
    for p in student:
        p.requires_grad_(False)
    try:
        done = 0
        while done < steps:
            for batch in loader:
                images = repeat_channels(batch["image"], in_channels).to(device)
                labels = batch["label"].to(device)
                subject = batch["subject"].to(device) if "subject" in batch else None
                out = distiller(images, None, labels=labels, subject=subject)
                loss = sum(weights[n] * v for n, v in out.terms.items() if n != output)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                if done == steps:
                    break
    finally:  # the student as it was, its batch-norm statistics included
        distiller.student.load_state_dict(kept)
        for p in student:
            p.requires_grad_(True)


def batch_figures(gradients: dict[str, torch.Tensor], output: str | None) -> dict[str, dict]:
    """norm_ratio, cos_seg and cos_output of every term but the segmentation loss."""
    seg = gradients[SEG]
    figures = {}
    for name, grad in gradients.items():
        if name == SEG:
            continue
        row = {
            "norm_ratio": float(grad.norm() / seg.norm().clamp_min(1e-12)),
            "cos_seg": float(torch.nn.functional.cosine_similarity(grad, seg, dim=0)),
        }
        if output is not None and name != output:
            row["cos_output"] = float(
                torch.nn.functional.cosine_similarity(grad, gradients[output], dim=0)
            )
        figures[name] = row
    features = [g for n, g in gradients.items() if n not in (SEG, output)]
    if len(features) > 1:  # the feature terms together
        total = torch.stack(features).sum(0)
        figures["all feature terms"] = {
            "norm_ratio": float(total.norm() / seg.norm().clamp_min(1e-12)),
            "cos_seg": float(torch.nn.functional.cosine_similarity(total, seg, dim=0)),
        }
    return figures


def summarise(per_batch: list[dict[str, dict]]) -> dict[str, dict]:
    """Mean and standard deviation over the batches of each term's figures."""
    summary: dict[str, dict] = {}
    for term in per_batch[0]:
        summary[term] = {}
        for key in per_batch[0][term]:
            values = [batch[term][key] for batch in per_batch]
            summary[term][key] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    return summary


@contextlib.contextmanager
def run_set_up(config: RunConfig, device: torch.device) -> Iterator[tuple[Any, Any, Any]]:
    """The data, networks and training step of a run of ``config``, made as the trainer makes
    them (in a temporary run folder, removed afterwards)."""
    with tempfile.TemporaryDirectory() as folder:
        run_dir = RunDir(Path(folder) / "probe")
        run_dir.create(config)
        seed_everything(config.train.seed)
        events = EventLog(run_dir.events)
        data = build_run_data(config, run_dir, resume=False, dist=Distributed(), device=device,
                              log=_quiet, events=events)  # fmt: skip
        data.cache.warm(data.train_ids + data.unlabelled_ids)
        models = build_run_models(config, data, resume=False, device=device, log=_quiet)
        if models.distiller is None:
            raise MTKDError(f"the run {config.name} has no distillation term to probe")
        step = build_optimisation(config, models, data.activation, device, False)[3]
        yield data, models, step


def probe_cell(ablation: Any, cell: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The figures of one cell, at initialisation and (with --trained) at trained weights."""
    config = ablation.run_config(cell, args.seed, args.split_seed).with_absolute_paths()
    device = resolve_device(args.device or config.train.device)
    states = {"initialisation": None}
    if args.trained:
        states["trained"] = Path(args.trained) / "checkpoints" / "best.pt"
    result: dict[str, Any] = {"config": config.name}
    with run_set_up(config, device) as (data, models, step):
        distiller = models.distiller
        for state, checkpoint in states.items():
            distiller.train()
            data.train_set.reseed(args.seed)
            loader = DataLoader(
                data.train_set,
                batch_size=config.train.batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(args.seed),
            )
            channels = data.prep.in_channels
            if checkpoint is not None:
                models.network.load_state_dict(load_checkpoint(checkpoint)["model"])
                lr = config.train.optimizer.lr
                fit_connectors(distiller, loader, args.fit_connectors, lr, channels)
            weights = term_weights(distiller)
            output = distiller.output.loss if distiller.output else None
            output = output if output and weights[output] else None
            per_batch = []
            for index, batch in enumerate(loader):
                if index == args.batches:
                    break
                gradients = term_gradients(batch, step, distiller, channels)
                per_batch.append(batch_figures(gradients, output))
            result[state] = summarise(per_batch)
            result[state]["batches"] = len(per_batch)
    return result


def markdown(results: dict[str, Any]) -> str:
    """One table row per cell, weights and term."""
    lines = [
        "| cell | weights | term | norm / seg | cos with seg | cos with output term |",
        "|---|---|---|---|---|---|",
    ]
    for cell, result in results.items():
        for state in ("initialisation", "trained"):
            if state not in result:
                continue
            for term, figures in result[state].items():
                if term == "batches":
                    continue
                cells = [
                    f"{figures[key]['mean']:+.3f} ± {figures[key]['sd']:.3f}"
                    if key in figures else "–"
                    for key in ("norm_ratio", "cos_seg", "cos_output")
                ]  # fmt: skip
                lines.append(f"| {cell} | {state} | {term} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="an evidence grid config, e.g. bench/kd_evidence/s1.yaml")
    parser.add_argument("output", type=Path, help="the JSON file to write")
    parser.add_argument("--cells", nargs="+", default=["paper"], help="cells to probe")
    parser.add_argument("--data", help="replace data.source (the cohort folder)")
    parser.add_argument("--teacher", help="replace distill.teacher ({split_seed} allowed)")
    parser.add_argument(
        "--split-seed", type=int, help="the runs' split seed (default: the grid's first)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--trained", help="a finished run folder of the same student")
    parser.add_argument(
        "--fit-connectors",
        type=int,
        default=200,
        metavar="STEPS",
        help="batches on which the connectors are fitted to the --trained student first "
        "(default 200; 0: probe it through new connectors)",
    )
    parser.add_argument("--device", help="cpu, cuda, ... (default: the grid's)")
    args = parser.parse_args(argv)
    ablation = load_ablation(args.grid, data_source=args.data, teacher=args.teacher)
    if args.split_seed is None and ablation.split_seeds is not None:
        args.split_seed = ablation.split_seeds[0]
    cells = {cell.name: cell for cell in ablation.cells}
    unknown = [name for name in args.cells if name not in cells]
    if unknown:
        print(f"unknown cell(s) {unknown}; the grid has {sorted(cells)}", file=sys.stderr)
        return 2
    results = {name: probe_cell(ablation, cells[name], args) for name in args.cells}
    atomic_write_bytes(args.output, (json.dumps(results, indent=1) + "\n").encode())
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
