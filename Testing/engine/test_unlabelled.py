"""Teacher targets on images without labels (``distill.unlabelled``, ``train_on: none``) and
early stopping (``train.patience``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DATA, STRUCTURES, tiny_config
from helpers import expect_error, stop_at_batch, untrained_model

from mtkd.config import RunConfig, load_config
from mtkd.config_paths import relative_paths, resolve_paths
from mtkd.data.datasets import Case, load_dataset, load_unlabelled
from mtkd.data.labels import LabelTable
from mtkd.data.loading import PatchDataset, SliceDataset, VolumeCache
from mtkd.data.preprocess import Preprocessing
from mtkd.data.splits import split_cases
from mtkd.distill.distiller import Distiller
from mtkd.distill.presets import scale_taps
from mtkd.distill.spec import OutputTerm, TapPair
from mtkd.engine.seg_loss import SegmentationLoss
from mtkd.engine.step import TrainingStep, labelled_seg_loss
from mtkd.engine.trainer import Trainer, TrainingInterrupted, resume_run
from mtkd.errors import MTKDError
from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.modelfiles.model_io import build_from_spec, load_model
from mtkd.run_folder import read_events

TINY = {"name": "thesis_unet", "params": {"channels": [4, 8], "bottleneck": 16}}


def quiet(config: RunConfig | dict, run_dir, **options) -> Trainer:
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    return Trainer(config, run_dir, progress=False, log=lambda _: None, **options)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """An untrained tiny 2-D model of the three structures: real teacher targets, instantly."""
    return untrained_model(tmp_path_factory.mktemp("teacher") / "model", tuple(STRUCTURES))


@pytest.fixture
def kd_config(make_config, teacher):
    """A one-epoch distillation config on the slab dataset; overrides as in make_config."""

    def make(**overrides):
        defaults = {
            "name": "kd",
            "model": TINY,
            "train_on": "student_train",
            "distill": {"teacher": str(teacher), "preset": "thesis"},
            "train": {"epochs": 1, "batch_size": 4, "optimizer": {"name": "adamw", "lr": 1e-2}},
        }
        return make_config("distill", **{**defaults, **overrides})

    return make


def _metrics(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "metrics"]


def _status(run_dir: Path, state: str) -> list[dict]:
    events = read_events(run_dir / "events.jsonl")
    return [e for e in events if e["type"] == "status" and e.get("state") == state]


# ----------------------------------------------------------------- the loss of one batch
def _mixed_batch(classes: int = 4):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, classes, 16, 16, generator=generator)
    labels = torch.randint(0, classes, (4, 1, 16, 16), generator=generator)
    has_label = torch.tensor([True, False, True, False])
    return logits, labels, has_label


@pytest.mark.parametrize("kind", ["dice_ce", "dice", "ce"])
def test_seg_loss_of_a_mixed_batch_is_the_loss_of_its_labelled_samples(kind):
    seg_loss = SegmentationLoss(kind, "softmax")
    logits, labels, has_label = _mixed_batch()
    garbage, zeros = labels.clone(), labels.clone()
    # the class each unlabelled voxel's logits like least: a placeholder the loss would notice
    garbage[~has_label] = logits[~has_label].argmin(1, keepdim=True)
    zeros[~has_label] = 0
    labelled_only = seg_loss(logits[has_label], labels[has_label])
    for placeholder in (labels, garbage, zeros):
        mixed = labelled_seg_loss(seg_loss, logits, placeholder, has_label)
        assert torch.allclose(mixed, labelled_only, atol=1e-6)
    assert not torch.allclose(seg_loss(logits, garbage), labelled_only, atol=1e-3)


def test_a_batch_without_labels_has_seg_loss_zero_and_a_finite_gradient():
    network = build_from_spec(
        {**TINY, "params": {**TINY["params"], "in_channels": 1, "out_channels": 4}}
    )
    step = TrainingStep(
        network, SegmentationLoss("dice_ce", "softmax"), seg_weight=1.0, activation="softmax"
    )
    images = torch.rand(2, 1, 32, 32)
    labels = torch.full((2, 1, 32, 32), 99)  # garbage no loss could take
    loss, terms = step(images, labels, has_label=torch.tensor([False, False]))
    assert loss.item() == 0.0 and terms["seg"].item() == 0.0
    loss.backward()
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_distillation_terms_cover_every_sample_and_seg_only_the_labelled():
    torch.manual_seed(0)
    student_spec = {
        "name": "thesis_unet",
        "params": {**TINY["params"], "in_channels": 1, "out_channels": 4},
    }
    teacher_spec = {
        "name": "thesis_unet",
        "params": {"channels": [8, 16], "bottleneck": 32, "in_channels": 1, "out_channels": 4},
    }
    student, teacher = build_from_spec(student_spec), build_from_spec(teacher_spec)
    s_taps = scale_taps("thesis_unet", student_spec["params"])
    t_taps = scale_taps("thesis_unet", teacher_spec["params"])
    pairs = [TapPair(s_taps[k], t_taps[k], "infonce", 0.1, None, k) for k in ("B-B", "D-D")]
    distiller = Distiller(
        student, teacher, pairs, OutputTerm("pmd", 0.2, 4.0), torch.zeros(2, 1, 32, 32)
    )
    seg_loss = SegmentationLoss("dice_ce", "softmax")
    step = TrainingStep(distiller, seg_loss, seg_weight=1.0, activation="softmax").eval()
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (4, 1, 32, 32), generator=torch.Generator().manual_seed(2))
    has_label = torch.tensor([True, False, True, False])
    images[~has_label] = images[~has_label] * 10  # other images than the labelled ones
    with torch.no_grad():
        loss, terms = step(images, labels, has_label=has_label)
        full = distiller(images)
        labelled = distiller(images[has_label])
    for name in ("B-B", "D-D", "pmd"):
        assert torch.allclose(terms[name], full.terms[name], atol=1e-6), name
        assert not torch.allclose(terms[name], labelled.terms[name], rtol=0.01), name
    seg = seg_loss(full.student_logits[has_label], labels[has_label])
    assert torch.allclose(terms["seg"], seg, atol=1e-6)
    assert torch.allclose(loss, seg + full.loss, atol=1e-5)


# ------------------------------------------------------------------------------ the data
def test_items_carry_has_label_and_the_index_of_their_patient(slab_dataset):
    folder, _ = slab_dataset
    files = load_dataset(folder).cases[:3]
    cases = [
        Case("a", files[0].image, files[0].label, "p1"),
        Case("b", files[1].image, files[1].label, "p1"),
        Case("c", files[2].image, Path("missing-label.nii.gz"), "p2"),  # never read
    ]
    source = LabelTable.from_json(DATA / "labels_total_v2.json")
    _, mapping = source.select(["liver"])
    for dims, size in ((2, (16, 16)), (3, (16, 16, 8))):
        prep = Preprocessing(dims, (-160.0, 240.0), None, True, size[:2], (16, 16, 8), 1)
        cache = VolumeCache(cases, source, mapping, prep, unlabelled=["c"])
        assert not cache["c"].has_label and not cache["c"].label.any()
        assert cache["c"].label.shape == cache["c"].image.shape
        if dims == 2:
            data = SliceDataset(cache, ["a", "b", "c"], None)
            owner = [case_id for case_id, _ in data.index]
        else:
            data = PatchDataset(cache, ["a", "b", "c"], size, 2, 2, None)
            owner = [case_id for case_id in ["a", "b", "c"] for _ in range(2)]
        items = [data[i] for i in range(len(data))]
        for case_id, item in zip(owner, items):
            assert item["has_label"].dtype == torch.bool
            assert bool(item["has_label"]) == (case_id != "c")
            assert item["subject"].dtype == torch.int64
        subject = {case_id: int(item["subject"]) for case_id, item in zip(owner, items)}
        assert subject["a"] == subject["b"] != subject["c"]
        batch = torch.utils.data.default_collate(items[:3])
        assert batch["has_label"].shape == batch["subject"].shape == (3,)


def _image_copies(cases: list[Case], folder: Path, prefix: str) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for number, case in enumerate(cases):
        shutil.copy(case.image, folder / f"{prefix}{number}.nii.gz")
        names.append(f"{prefix}{number}")
    return names


def test_unlabelled_images_are_read_from_any_dataset_layout(slab_dataset, tmp_path):
    cases = load_dataset(slab_dataset[0]).cases[:2]
    flat = tmp_path / "flat"
    names = _image_copies(cases, flat, "scan")
    assert [c.case_id for c in load_unlabelled(flat)] == names
    pairs = tmp_path / "pairs"
    _image_copies(cases, pairs / "imagesTr", "x")
    assert [c.case_id for c in load_unlabelled(pairs)] == ["x0", "x1"]  # no labelsTr/ needed
    msd = tmp_path / "msd"
    _image_copies(cases, msd / "imagesTr", "m")
    training = [
        {"image": "./imagesTr/m0.nii.gz"},
        {"image": "./imagesTr/m1.nii.gz", "label": "./labelsTr/absent.nii.gz"},
    ]
    (msd / "dataset.json").write_text(json.dumps({"training": training}))
    found = load_unlabelled(msd)
    assert [c.case_id for c in found] == ["m0", "m1"] and all(c.label is None for c in found)
    assert [c.case_id for c in load_unlabelled(flat / "scan1.nii.gz")] == ["scan1"]
    (tmp_path / "empty").mkdir()
    with expect_error(tmp_path / "empty", "no images"):
        load_unlabelled(tmp_path / "empty")


# ------------------------------------------------------------------------------ the runs
def test_unlabelled_train_adds_exactly_the_non_student_training_patients(
    slab_dataset, kd_config, tmp_path
):
    folder, fixed = slab_dataset
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    split = split_cases(load_dataset(data).cases, fixed=fixed, student_fraction=0.5, seed=0)
    others = sorted(set(split.train) - set(split.student_train))
    assert others and split.student_train
    for case in load_dataset(data).cases:  # their labels are never read: spoil them
        if case.case_id in others:
            case.label.write_bytes(b"not an image")
    config = kd_config(distill__unlabelled="train")
    config["data"]["source"] = str(data)
    trainer = quiet(config, tmp_path / "kd")
    trainer.run()
    assert sorted(trainer.data.unlabelled_ids) == others
    assert trainer.data.train_ids == split.student_train
    slices = sum(trainer.data.cache[c].image.shape[-1] for c in split.train)
    (training,) = _status(tmp_path / "kd", "training")
    assert training["unlabelled_cases"] == len(others)
    assert training["train_cases"] == len(split.student_train)
    assert training["train_samples"] == slices  # every training patient's images
    assert all(not trainer.data.cache[c].has_label for c in others)
    assert all(trainer.data.cache[c].has_label for c in split.student_train + split.val)


def test_a_folder_of_unlabelled_cts_joins_and_is_fingerprinted(slab_dataset, kd_config, tmp_path):
    cases = load_dataset(slab_dataset[0]).cases
    train = set(slab_dataset[1]["train"])
    extra = tmp_path / "extra"
    names = _image_copies([c for c in cases if c.case_id in train][:2], extra, "scan")
    config = kd_config(distill__unlabelled=str(extra))
    trainer = quiet(config, tmp_path / "kd")
    trainer.run()
    assert trainer.data.unlabelled_ids == names
    (training,) = _status(tmp_path / "kd", "training")
    assert training["unlabelled_cases"] == 2
    fingerprint = json.loads((tmp_path / "kd" / "fingerprint.json").read_text())
    assert sorted(fingerprint["unlabelled"]) == names
    # a resume sees a changed unlabelled image and refuses, naming it
    shutil.copy(cases[0].image, extra / "scan1.nii.gz")
    with pytest.raises(MTKDError, match="unlabelled image.*changed: scan1"):
        quiet(config, tmp_path / "kd", resume=True).run()


def test_an_unlabelled_image_of_a_held_out_case_is_refused(slab_dataset, kd_config, tmp_path):
    cases = {c.case_id: c for c in load_dataset(slab_dataset[0]).cases}
    test_case = slab_dataset[1]["test"][0]
    extra = tmp_path / "extra"
    _image_copies([cases[test_case]], extra, "scan")
    with pytest.raises(MTKDError, match=f"distill.unlabelled.*test case {test_case}"):
        quiet(kd_config(distill__unlabelled=str(extra)), tmp_path / "kd").run()
    clash = tmp_path / "clash"
    clash.mkdir()
    shutil.copy(cases[test_case].image, clash / f"{slab_dataset[1]['train'][0]}.nii.gz")
    with pytest.raises(MTKDError, match="distill.unlabelled.*data.source also has"):
        quiet(kd_config(distill__unlabelled=str(clash)), tmp_path / "kd2").run()


def test_label_free_distillation_trains_on_teacher_targets_and_exports(kd_config, tmp_path):
    config = kd_config(train_on="none", distill__unlabelled="train")
    result = quiet(config, tmp_path / "free").run()
    (training,) = _status(tmp_path / "free", "training")
    split = json.loads((tmp_path / "free" / "split.json").read_text())
    assert training["train_cases"] == 0
    assert training["unlabelled_cases"] == len(split["train"])
    (metrics,) = _metrics(tmp_path / "free")
    assert metrics["seg"] == 0.0 and metrics["pmd"] > 0 and metrics["B-B"] > 0
    assert "val_dice" in metrics  # validated on the labelled validation cases
    model = load_model(result.model_dir)
    assert model.metadata["lineage"]["distilled"] is True
    assert list(model.labels.names) == STRUCTURES


def test_the_no_kd_baseline_leaves_the_unlabelled_images_out(kd_config, tmp_path):
    """With every distillation weight 0 nothing uses an unlabelled image: the baseline of a
    run with distill.unlabelled is the plain no-KD run."""
    trainer = quiet(kd_config(distill__unlabelled="train", distill__scale=0.0), tmp_path / "b")
    trainer.run()
    assert trainer.data.unlabelled_ids == [] and trainer.models.distiller is None
    (training,) = _status(tmp_path / "b", "training")
    labelled = sum(trainer.data.cache[c].image.shape[-1] for c in trainer.data.train_ids)
    assert training["unlabelled_cases"] == 0 and training["train_samples"] == labelled
    zero = {"teacher": kd_config()["distill"]["teacher"], "output": {"weight": 0.0}}
    config = kd_config(train_on="none", distill={**zero, "unlabelled": "train"})
    with pytest.raises(MTKDError, match="train_on: none .*every weight is 0"):
        quiet(config, tmp_path / "free").run()


def test_a_run_with_a_relative_unlabelled_folder_travels(slab_dataset, teacher, tmp_path):
    here = tmp_path / "here"
    shutil.copytree(slab_dataset[0], here / "data")
    cases = load_dataset(here / "data").cases[:2]
    _image_copies(cases, here / "extra", "scan")
    config = tiny_config(
        (here / "data", slab_dataset[1]), "distill", name="kd", model=TINY, train_on="student_train"
    )
    config["data"]["source"] = "data"
    config["distill"] = {"teacher": str(teacher), "preset": "thesis", "unlabelled": "extra"}
    config["train"]["epochs"] = 1
    (here / "config.yaml").write_text(yaml.safe_dump(config))
    trainer = quiet(load_config(here / "config.yaml"), here / "run")
    stop_at_batch(trainer, 2)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    written = yaml.safe_load((here / "run" / "config.yaml").read_text())
    assert written["distill"]["unlabelled"] == "../extra"
    there = tmp_path / "there"
    shutil.copytree(here, there)
    shutil.rmtree(here)  # the absolute paths recorded in the run lead nowhere now
    result = resume_run(there / "run", progress=False, log=lambda _: None)
    assert result.model_dir.is_dir()
    fingerprint = json.loads((there / "run" / "fingerprint.json").read_text())
    assert sorted(fingerprint["unlabelled"]) == ["scan0", "scan1"]


# ------------------------------------------------------------------------ config errors
def _bad_configs() -> dict:
    return {
        "unknown value": (
            {"distill": {"unlabelled": "trian"}},
            "distill.unlabelled",
            "none, train",
        ),
        "not text": ({"distill": {"unlabelled": 3}}, "distill.unlabelled", "str"),
        "train_on": ({"train_on": "some"}, "train_on", "'none'"),
        "label-free teacher": ({"kind": "train", "train_on": "none"}, "train_on", "kind: distill"),
        "nothing to add": (
            {"train_on": "train", "distill": {"unlabelled": "train"}},
            "distill.unlabelled",
            "leaves none out",
        ),
        "no images": (
            {"train_on": "none", "distill": {"unlabelled": "none"}},
            "train_on",
            "distill.unlabelled",
        ),
        "no terms": (
            {"train_on": "none", "distill": {"unlabelled": "train", "scale": 0.0}},
            "distill.scale",
            "no loss",
        ),
        "supcon": (
            {"train_on": "none", "distill": {"unlabelled": "train", "feature_loss": "supcon"}},
            "distill.feature_loss",
            "needs labels",
        ),
        "patience": ({"train": {"patience": 0}}, "train.patience", ">= 1"),
    }


@pytest.mark.parametrize("case", list(_bad_configs()))
def test_config_errors_name_the_file_and_the_key(case, make_config, teacher, tmp_path):
    changes, key, words = _bad_configs()[case]
    config = make_config(
        "distill",
        model=TINY,
        train_on="student_train",
        distill={"teacher": str(teacher), "preset": "thesis"},
    )
    for section, value in changes.items():
        if isinstance(value, dict):
            config.setdefault(section, {}).update(value)
        else:
            config[section] = value
    if config["kind"] == "train":
        config.pop("distill")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with expect_error(path, key, words):
        Trainer(load_config(path), tmp_path / "run", progress=False, log=lambda _: None).run()
    assert not (tmp_path / "run").exists()


def test_unlabelled_words_are_not_paths_but_a_folder_of_that_name_is(tmp_path):
    (tmp_path / "run" / "train").mkdir(parents=True)
    for word in ("none", "train", "auto"):
        data = {"distill": {"unlabelled": word}}
        assert resolve_paths(data, tmp_path)[0] == data
        assert relative_paths(data, tmp_path) == (data, {})
    folder = str(tmp_path / "run" / "train")
    written, section = relative_paths({"distill": {"unlabelled": folder}}, tmp_path / "run")
    assert written["distill"]["unlabelled"] == "./train"
    assert section == {"distill.unlabelled": folder}
    read, _ = resolve_paths(written, tmp_path / "run")
    assert read["distill"]["unlabelled"] == folder


# ---------------------------------------------------------------------- early stopping
def _expected_stop(dice: list[float], patience: int) -> int | None:
    """The epoch (from 1) at which ``patience`` checks without a better Dice have passed."""
    best, stale = -1.0, 0
    for epoch, value in enumerate(dice, start=1):
        best, stale = (value, 0) if value > best else (best, stale + 1)
        if stale >= patience:
            return epoch
    return None


PATIENCE = 2


def _patience_config(make_config) -> dict:
    return make_config(
        "train",
        name="es",
        model=TINY,
        multitask={"reconstruction": "none"},
        train={
            "epochs": 8,
            "batch_size": 4,
            "patience": PATIENCE,
            "optimizer": {"name": "adamw", "lr": 0.03},
        },
    )


def test_early_stopping_stops_at_the_right_epoch_and_survives_resume(make_config, tmp_path):
    config = _patience_config(make_config)
    straight = quiet(config, tmp_path / "straight").run()
    dice = [record["val_dice"] for record in straight.history]
    stop = _expected_stop(dice, PATIENCE)
    assert stop is not None and stop < 8, dice  # this recipe has a setback within 8 epochs
    assert straight.epochs == stop == len(dice)
    assert straight.best_epoch == max(range(1, stop + 1), key=lambda e: (dice[e - 1], -e))
    (stopped,) = _status(tmp_path / "straight", "stopped_early")
    assert stopped["message"].startswith(
        f"stopped early at epoch {stop}, best epoch {straight.best_epoch}"
    )
    done = read_events(tmp_path / "straight" / "events.jsonl")[-1]
    assert done["type"] == "done" and done["best_epoch"] == straight.best_epoch
    exported = load_model(straight.model_dir).network.state_dict()
    best = load_checkpoint(tmp_path / "straight" / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(exported[key], best[key]) for key in best)

    # resuming a run that stopped early trains nothing more and exports the same model
    events = len(read_events(tmp_path / "straight" / "events.jsonl"))
    again = resume_run(tmp_path / "straight", progress=False, log=lambda _: None)
    new = read_events(tmp_path / "straight" / "events.jsonl")[events:]
    assert not [e for e in new if e["type"] == "metrics"] and new[-1]["type"] == "done"
    assert again.epochs == stop and again.best_epoch == straight.best_epoch
    reexported = load_model(again.model_dir).network.state_dict()
    assert all(torch.equal(exported[key], reexported[key]) for key in exported)

    # interrupted after a check without improvement: the count is in the checkpoint
    first_stale = next(e for e in range(2, stop + 1) if dice[e - 1] <= max(dice[: e - 1]))
    batches = (straight.history[0]["samples"]) // 4
    trainer = quiet(config, tmp_path / "stopped")
    stop_at_batch(trainer, first_stale * batches + 1)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    state = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert state["epoch"] == first_stale and state["stale_checks"] == 1
    resumed = resume_run(tmp_path / "stopped", progress=False, log=lambda _: None)
    assert resumed.epochs == stop and resumed.best_epoch == straight.best_epoch
    assert [r["val_dice"] for r in resumed.history] == dice
