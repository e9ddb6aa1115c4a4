"""The anchor to the parent version (``distill.anchor``, issue 17 part 7): the parent as a
second, output-level teacher. Its term adds to the loss (zero when the student is the parent),
is logged as its own term, travels with the run folder by a relative path, is checked on
resume like the teacher, and a parent of other structures is refused."""

from __future__ import annotations

import copy as copying
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from helpers import stop_at_batch

from mtkd.config import RunConfig
from mtkd.data.labels import LabelTable
from mtkd.distill.anchor import ParentAnchor
from mtkd.engine.seg_loss import SegmentationLoss
from mtkd.engine.step import TrainingStep
from mtkd.engine.trainer import Trainer, TrainingInterrupted
from mtkd.errors import MTKDError
from mtkd.modelfiles.model_io import build_from_spec, export_model, load_model
from mtkd.run_folder import RunDir, read_events

STUDENT = {"name": "thesis_unet", "params": {"channels": [4, 8], "bottleneck": 8}}


def quiet(config: dict, run: Path, **options) -> Trainer:
    return Trainer(RunConfig.from_dict(config), run, progress=False, log=lambda _: None, **options)


def student_config(root: Path, split: dict, anchor: dict | None = None, **distill) -> dict:
    """A tiny distillation on ROOT/data from ROOT/teacher, fine-tuned from ROOT/parent."""
    config = tiny_config(
        (root / "data", split),
        "distill",
        name="student",
        model={**STUDENT, "init_from": str(root / "parent")},
        train_on="student_train",
        distill={"teacher": str(root / "teacher"), "unlabelled": "none", **distill},
    )
    if anchor is not None:
        config["distill"]["anchor"] = anchor
    config["train"]["batch_size"] = 2
    return config


@pytest.fixture(scope="module")
def project(slab_dataset, teacher_run, tmp_path_factory) -> tuple[Path, dict]:
    """PROJECT/data, PROJECT/teacher, PROJECT/parent (a tiny student, one epoch: the version
    fine-tuned from) and PROJECT/run: a two-epoch fine-tune anchored to the parent, written
    from a configuration FILE with relative paths, stopped in its first epoch."""
    folder, split = slab_dataset
    root = tmp_path_factory.mktemp("anchor") / "project"
    shutil.copytree(folder, root / "data")
    shutil.copytree(teacher_run / "model", root / "teacher")
    distill = {"teacher": str(root / "teacher"), "unlabelled": "none"}
    parent = tiny_config((root / "data", split), "distill", name="parent", model=STUDENT,
                         distill=distill)  # fmt: skip
    parent["train"]["epochs"] = 1
    quiet(parent, root / "parent-run").run()
    shutil.copytree(root / "parent-run" / "model", root / "parent")
    config = student_config(root, split, {"model": "parent", "weight": 0.5})
    for section, key in (("data", "source"), ("data", "labels_json"), ("distill", "teacher")):
        config[section][key] = os.path.relpath(config[section][key], root)
    config["model"]["init_from"] = "parent"
    (root / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    from mtkd.config import load_config

    trainer = Trainer(load_config(root / "run.yaml"), root / "run", progress=False,
                      log=lambda _: None)  # fmt: skip
    stop_at_batch(trainer, 2)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    return root, split


@pytest.fixture
def moved(project, tmp_path) -> Path:
    """The project moved elsewhere: the run finds data, teacher and parent beside it."""
    target = tmp_path / "elsewhere"
    shutil.copytree(project[0], target)
    return target


def test_the_term_adds_to_the_loss_and_is_zero_for_the_parent_itself(project):
    root, _ = project
    parent = load_model(root / "parent")
    images = torch.rand(2, 1, 32, 32)
    labels = torch.randint(0, 4, (2, 1, 32, 32))

    def step(network, anchor):
        module = TrainingStep(network, SegmentationLoss("dice_ce", "softmax"), seg_weight=1.0,
                              activation="softmax", anchor=anchor)  # fmt: skip
        return module.eval()(images, labels)

    anchor = ParentAnchor(parent.network, 0.5, 1.0)
    same, terms = step(copying.deepcopy(parent.network), anchor)
    assert float(terms["anchor"]) == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(3)
    other = build_from_spec(parent.metadata["network"])
    without, plain_terms = step(other, None)
    without = without.detach()
    with_anchor, terms = step(other, anchor)
    assert "anchor" not in plain_terms and float(terms["anchor"]) > 1e-3
    expected = float(without) + 0.5 * float(terms["anchor"])
    assert float(with_anchor.detach()) == pytest.approx(expected)
    assert not any(p.requires_grad for p in parent.network.parameters())
    assert not [key for key in anchor.state_dict()]  # the parent is no part of the tree


def test_the_anchor_travels_with_the_run_folder_and_is_logged(moved):
    run = moved / "run"
    stored = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert stored["distill"]["anchor"]["model"] == "../parent"
    assert RunDir(run).load_config().distill.anchor.model == str((moved / "parent").resolve())
    result = Trainer(RunDir(run).load_config(), run, resume=True, progress=False,
                     log=lambda _: None).run()  # fmt: skip
    assert result.epochs == 2
    metrics = [e for e in read_events(run / "events.jsonl") if e["type"] == "metrics"]
    assert len(metrics) == 2 and all(e["anchor"] > 0 for e in metrics)
    lineage = load_model(run / "model").metadata["lineage"]
    assert lineage["anchor"]["path"] == str((moved / "parent").resolve())
    assert lineage["anchor"]["weights_sha256"] == lineage["previous"]["weights_sha256"]


def test_a_changed_anchor_is_refused_on_resume(moved, teacher_run):
    run = moved / "run"
    checkpoint = (run / "checkpoints" / "last.pt").read_bytes()
    shutil.rmtree(moved / "parent")
    shutil.copytree(teacher_run / "model", moved / "parent")
    with pytest.raises(MTKDError) as info:
        Trainer(RunDir(run).load_config(), run, resume=True, progress=False,
                log=lambda _: None).run()  # fmt: skip
    message = str(info.value)
    assert message.startswith(f"{run}: cannot resume") and "the anchor changed" in message
    assert "model.pt" in message and "teacher" not in message.split("Put")[0]
    assert (run / "checkpoints" / "last.pt").read_bytes() == checkpoint


def test_a_parent_of_other_structures_is_refused(project, tmp_path):
    root, split = project
    parent = load_model(root / "parent")
    spec = copying.deepcopy(parent.metadata["network"])
    spec["params"]["out_channels"] = 3
    other = tmp_path / "two-structures"
    export_model(build_from_spec(spec), other, spec=spec, labels=LabelTable({1: "liver",
                 2: "spleen"}), prep=parent.prep, activation="softmax", lineage={})  # fmt: skip
    config = student_config(root, split, {"model": str(other)})
    with pytest.raises(MTKDError) as info:
        quiet(config, tmp_path / "run").run()
    message = str(info.value)
    assert message.startswith(str(other)) and "distill.anchor.model" in message
    assert "['liver', 'spleen']" in message and "structures" in message
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_anchor_settings_are_checked(project):
    root, split = project
    for anchor, key in (({"model": "parent", "temperature": 0}, "distill.anchor.temperature"),
                        ({"model": "parent", "weight": -1}, "distill.anchor.weight"),
                        ({"model": " "}, "distill.anchor.model")):  # fmt: skip
        with pytest.raises(MTKDError, match=key.replace(".", r"\.")):
            RunConfig.from_dict(student_config(root, split, anchor))
