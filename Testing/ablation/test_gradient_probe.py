"""bench/kd_evidence/gradient_probe.py: each distillation term's gradient on the student against
the segmentation loss's, for a cell of an evidence grid, on tiny networks and real CT slabs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import ablation_config, tiny_config
from helpers import load_bench_script

from mtkd.config import RunConfig
from mtkd.engine.trainer import Trainer

STUDENT = {"name": "thesis_unet", "params": {"channels": [4, 8], "bottleneck": 8}}


@pytest.fixture(scope="module")
def probe():
    return load_bench_script("kd_evidence/gradient_probe.py", "gradient_probe_bench")


def test_figures_are_norm_ratios_and_cosines_against_the_labels_loss(probe):
    gradients = {
        "seg": torch.tensor([1.0, 0.0, 0.0]),
        "E-E": torch.tensor([0.0, 3.0, 0.0]),  # orthogonal, three times as loud
        "B-B": torch.tensor([-1.0, 0.0, 0.0]),  # against the labels
        "pmd": torch.tensor([2.0, 0.0, 0.0]),  # the output term, with them
    }
    figures = probe.batch_figures(gradients, "pmd")
    assert figures["E-E"] == pytest.approx({"norm_ratio": 3, "cos_seg": 0, "cos_output": 0})
    assert figures["B-B"] == pytest.approx({"norm_ratio": 1, "cos_seg": -1, "cos_output": -1})
    assert figures["pmd"] == pytest.approx({"norm_ratio": 2, "cos_seg": 1})
    together = figures["all feature terms"]  # E-E + B-B = (-1, 3, 0)
    assert together == pytest.approx({"norm_ratio": math.sqrt(10), "cos_seg": -1 / math.sqrt(10)})
    summary = probe.summarise(
        [figures, probe.batch_figures({**gradients, "pmd": -gradients["pmd"]}, "pmd")]
    )
    assert summary["pmd"]["cos_seg"] == pytest.approx({"mean": 0, "sd": math.sqrt(2)})


@pytest.fixture(scope="module")
def trained_student(slab_dataset, tmp_path_factory):
    """A tiny student of the grid's network, trained alone for one epoch (its run folder)."""
    config = tiny_config(slab_dataset, "train", name="alone", model=STUDENT)
    config["multitask"] = {"reconstruction": "none"}
    config["train"]["epochs"] = 1
    run = tmp_path_factory.mktemp("alone") / "run"
    Trainer(RunConfig.from_dict(config), run, progress=False, log=lambda _: None).run()
    return run


def test_the_probe_reports_every_weighted_term_at_both_weights(
    probe, slab_dataset, teacher_run, trained_student, tmp_path, capsys
):
    cells = [
        {"name": "paper", "pairs": ["E-E", "B-B", "D-D"], "feature_loss": "infonce",
         "output_loss": "pmd"},
        {"name": "bb_alone", "pairs": ["B-B"], "feature_loss": "infonce", "output_loss": "none"},
    ]  # fmt: skip
    config = ablation_config(slab_dataset, teacher_run, {"seeds": [0], "cells": cells})
    config["model"] = STUDENT
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "probe.json"
    argv = [str(grid), str(out), "--cells", "paper", "bb_alone", "--batches", "2"]
    assert probe.main([*argv, "--trained", str(trained_student), "--fit-connectors", "3"]) == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    assert set(results["paper"]) == {"config", "initialisation", "trained"}
    for state in ("initialisation", "trained"):
        paper = results["paper"][state]
        assert paper["batches"] == 2
        assert set(paper) == {"batches", "E-E", "B-B", "D-D", "pmd", "all feature terms"}
        for term in ("E-E", "B-B", "D-D"):
            assert -1 <= paper[term]["cos_seg"]["mean"] <= 1
            assert -1 <= paper[term]["cos_output"]["mean"] <= 1
            assert paper[term]["norm_ratio"]["mean"] > 0
        # an output term at weight 0 is not in the loss, and not in the figures
        assert set(results["bb_alone"][state]) == {"batches", "B-B"}
        assert "cos_output" not in results["bb_alone"][state]["B-B"]
    printed = capsys.readouterr().out
    assert (
        "| paper | trained | pmd |" in printed and "| bb_alone | initialisation | B-B |" in printed
    )
    assert probe.main([*argv[:2], "--cells", "nonesuch"]) == 2


def test_fitting_the_connectors_leaves_the_student_alone(probe, slab_dataset, teacher_run):
    from torch.utils.data import DataLoader

    from mtkd.ablation.grid_config import ablation_from_dict

    cells = [{"name": "ebd", "pairs": ["E-E", "B-B"], "feature_loss": "infonce",
              "output_loss": "pmd"}]  # fmt: skip
    config = ablation_config(slab_dataset, teacher_run, {"seeds": [0], "cells": cells})
    config["model"] = STUDENT
    ablation = ablation_from_dict(config)
    cell = next(cell for cell in ablation.cells if cell.name == "ebd")
    run = ablation.run_config(cell, 0).with_absolute_paths()
    with probe.run_set_up(run, torch.device("cpu")) as (data, models, _):
        distiller = models.distiller
        student = {k: v.clone() for k, v in distiller.student.state_dict().items()}
        connectors = [p.detach().clone() for p in distiller.connectors.parameters()]
        loader = DataLoader(data.train_set, batch_size=4, shuffle=False)
        probe.fit_connectors(distiller, loader, 2, 1e-2, data.prep.in_channels)
        after = distiller.student.state_dict()
        assert all(torch.equal(student[k], after[k]) for k in student)  # BN statistics too
        moved = [
            not torch.equal(a, b) for a, b in zip(connectors, distiller.connectors.parameters())
        ]
        assert connectors and any(moved)
        assert all(p.requires_grad for p in distiller.student.parameters())


@pytest.fixture(scope="module")
def feature_probe():
    return load_bench_script("kd_evidence/feature_probe.py", "feature_probe_bench")


def test_a_linear_read_out_finds_what_a_map_holds(feature_probe):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (3000,), generator=generator)
    informative = torch.nn.functional.one_hot(labels, 3) * 4 + torch.randn(
        3000, 3, generator=generator
    )
    noise = torch.randn(3000, 3, generator=generator)
    for features, expected in ((informative, 0.95), (noise, 0.45)):
        read_out, mean, std = feature_probe.fit_read_out(features, labels, 3, steps=100)
        accuracy = (read_out((features - mean) / std).argmax(1) == labels).float().mean()
        assert (accuracy > expected) if expected > 0.5 else (accuracy < expected)
    sample, sampled = feature_probe.balanced_sample(
        informative, torch.tensor([0] * 2900 + [1] * 90 + [2] * 10), 3, 50, generator
    )
    assert torch.bincount(sampled).tolist() == [50, 50, 10] and len(sample) == 110


def test_the_feature_probe_scores_every_tap_of_both_networks(
    feature_probe, slab_dataset, teacher_run, trained_student, tmp_path, capsys
):
    cells = [{"name": "paper", "pairs": ["E-E", "B-B", "D-D"], "feature_loss": "infonce",
              "output_loss": "pmd"}]  # fmt: skip
    config = ablation_config(slab_dataset, teacher_run, {"seeds": [0], "cells": cells})
    config["model"] = STUDENT
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "features.json"
    argv = [str(grid), str(out), "--trained", str(trained_student), "--fit-batches", "2"]
    assert feature_probe.main([*argv, "--steps", "20"]) == 0
    pairs = json.loads(out.read_text(encoding="utf-8"))["pairs"]
    assert list(pairs) == ["E-E", "B-B", "D-D"]
    for row in pairs.values():
        assert list(row) == ["teacher", "student (initialisation)", "student (trained)"]
        for scores in row.values():
            assert 0 <= scores["dice"] <= 1 and 0 < scores["accuracy"] <= 1
        assert row["teacher"]["tap"] != row["student (trained)"]["tap"]
    assert "| D-D | teacher |" in capsys.readouterr().out
    assert feature_probe.main([*argv, "--cell", "nonesuch"]) == 2
