"""Protocols as presets (`mtkd protocol`): the shipped files hold the paper's values and run
end to end on small MSD-format folders made here from synthetic phantoms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from conftest import ROOT
from helpers import SPLEEN, TINY_T1, spleen_task09

from mtkd.cli import main
from mtkd.config import differing_keys, load_config
from mtkd.data.cohort import write_cohort
from mtkd.data.image_io import write_image
from mtkd.data.synth import make_subject
from mtkd.distill.presets import resolve_terms
from mtkd.errors import MTKDError
from mtkd.infer.pooled import (
    SliceCounts,
    axial_axis,
    mean_slice_dice,
    pooled_slice_dice,
    slice_counts,
)
from mtkd.models import build_network, build_teacher, count_parameters
from mtkd.protocols import available_protocols, load_protocol, write_configs
from mtkd.run_folder import read_events

MULTI = "3d-multiorgan"
EXAMPLES = ROOT / "examples"
THESIS_STAGES = ["teacher", "s1_kd", "s1_nokd", "s2_kd", "s2_nokd"]
TINY_3D = [
    "data.spacing=null",
    "data.patches_per_volume=2",
    "teacher:model.params={init_filters: 8, blocks_down: [1, 1, 1]}",
    "teacher:multitask.mask_patch=8",
    "student_kd:model.params={channels: [4, 8, 16], strides: [2, 2], num_res_units: 1, "
    "norm: BATCH}",
]


def _paths(tmp_path: Path) -> dict:
    return {"data": tmp_path / "data", "runs": tmp_path / "runs"}


def _without(config: dict, *keys: str) -> dict:
    config = json.loads(json.dumps(config))
    for key in keys:
        section, _, name = key.rpartition(".")
        (config[section] if section else config).pop(name)
    return config


# ----------------------------------------------------------------------- the preset files
def test_shipped_protocols_are_listed(capsys):
    assert {SPLEEN, MULTI} <= set(available_protocols())
    assert main(["protocol"]) == 0
    assert SPLEEN in capsys.readouterr().out


def test_thesis_preset_holds_the_papers_experiment(tmp_path):
    paths = _paths(tmp_path)
    protocol = load_protocol(SPLEEN, **paths)
    assert [stage.name for stage in protocol.stages] == THESIS_STAGES
    runs = paths["runs"].resolve()
    for stage in protocol.stages:
        config = stage.config
        assert config.name == stage.name
        assert config.data.source == str(paths["data"].resolve())
        assert config.data.dims == 2 and config.data.slice_size == [256, 256]
        assert config.data.structures == ["spleen"] and config.data.in_channels == 3
        assert config.split.student_fraction == 0.5
        assert config.split.val_fraction > 0 and config.split.test_fraction > 0
        assert config.split.fixed is None  # seeded split by patient
    teacher = protocol.stage("teacher").config
    assert teacher.kind == "train" and teacher.train_on == "train"
    assert teacher.model.name == "thesis_t1_backbone"
    assert teacher.multitask.reconstruction == "masked" and teacher.multitask.weight == 0.2
    assert (teacher.train.epochs, teacher.train.batch_size) == (200, 8)
    assert (teacher.train.optimizer.name, teacher.train.optimizer.lr) == ("adamw", 1e-4)
    assert (teacher.train.seg_loss, teacher.train.seg_weight) == ("dice_ce", 1.0)  # Dice + BCE
    t1 = build_teacher("thesis_t1_backbone", reconstruction="masked", in_channels=3)
    assert abs(count_parameters(t1) - 43.2e6) < 0.1e6
    t1_spec = {"name": "thesis_t1_backbone", "params": {}, "reconstruction": "masked"}
    for name, network, size in (("s1", "thesis_s1", 57_297), ("s2", "thesis_s2", 227_233)):
        kd, nokd = protocol.stage(f"{name}_kd"), protocol.stage(f"{name}_nokd")
        config = kd.config
        assert config.kind == "distill" and config.train_on == "student_train"
        assert config.model.name == network
        assert count_parameters(build_network(network, in_channels=3, out_channels=1)) == size
        assert config.multitask.reconstruction == "none"
        assert (config.train.epochs, config.train.batch_size) == (120, 20)
        assert (config.train.optimizer.name, config.train.optimizer.lr) == ("rmsprop", 1e-2)
        assert (config.train.seg_loss, config.train.seg_weight) == ("dice", 0.4)
        assert config.distill.preset == "thesis" and config.distill.scale == 1.0
        assert config.distill.teacher == str(runs / "teacher")
        pairs, output = resolve_terms(config.distill, {"name": network, "params": {}}, t1_spec)
        assert {p.name: (p.student, p.teacher, p.loss, p.weight, p.temperature) for p in pairs} == {
            "E-E": ("enc2", "backbone.enc2", "infonce", 0.1, 0.4),
            "B-B": ("bottleneck", "backbone.bottleneck", "infonce", 0.2, 0.4),
            "D-D": ("dec2", "backbone.dec4", "infonce", 0.1, 0.4),
        }
        assert (output.loss, output.weight, output.temperature) == ("pmd", 0.2, 4.0)
        # the no-KD twin: the identical recipe with every distillation weight at zero
        assert nokd.baseline_of == kd.name and nokd.config.distill.scale == 0
        assert _without(nokd.config.to_dict(), "name", "distill.scale") == _without(
            config.to_dict(), "name", "distill.scale"
        )
    assert protocol.expects == {"layout": "msd", "structures": ["spleen"]}
    assert protocol.reference["s1_kd"] == 0.772 and protocol.reference["s2_nokd"] == 0.770


def test_multiorgan_preset_is_3d_with_a_monai_multitask_teacher(tmp_path):
    protocol = load_protocol(MULTI, **_paths(tmp_path))
    assert [stage.name for stage in protocol.stages] == ["teacher", "student_kd", "student_nokd"]
    for stage in protocol.stages:
        data = stage.config.data
        assert data.dims == 3 and data.patch_size == [96, 96, 96]
        assert data.spacing == [1.5, 1.5, 2.0] and data.output == "softmax"
        assert data.structures == ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]
        assert data.augment.flip_prob == 0  # a flip would swap left and right kidneys
    teacher = protocol.stage("teacher").config
    assert teacher.model.name == "segresnet" and teacher.multitask.reconstruction == "masked"
    student = protocol.stage("student_kd").config
    assert student.model.name == "unet" and student.model.params["norm"] == "BATCH"
    assert student.distill.preset == "thesis" and student.train_on == "student_train"
    assert student.split.student_fraction == 0.5
    assert protocol.stage("student_nokd").config.distill.scale == 0
    params = {"spatial_dims": 3, "in_channels": 1, "out_channels": 6}
    big = build_teacher("segresnet", reconstruction="masked", **params, **teacher.model.params)
    small = build_network("unet", **params, **student.model.params)
    assert count_parameters(big) > 20 * count_parameters(small)


@pytest.mark.parametrize(
    ("example", "stage"), [("teacher.yaml", "teacher"), ("distill_thesis.yaml", "s1_kd")]
)
def test_examples_are_the_thesis_preset_s_stages(example, stage, tmp_path):
    """README: the examples are the preset's teacher and S1 stages as single files; only the
    paths differ, and the example spells out the pairs that `preset: thesis` fills."""
    config = load_config(EXAMPLES / example)
    preset = load_protocol(SPLEEN, **_paths(tmp_path)).stage(stage).config
    differing = set(differing_keys(config.to_dict(), preset.to_dict()))
    assert differing <= {
        "data.source",
        "distill.teacher",
        "distill.preset",
        "distill.pairs",
        "distill.output",
    }
    if config.distill is not None:
        t1 = {"name": "thesis_t1_backbone", "params": {}, "reconstruction": "masked"}
        network = {"name": config.model.name, "params": config.model.params}
        assert resolve_terms(config.distill, network, t1) == resolve_terms(
            preset.distill, network, t1
        )


def test_overrides_reach_stages_and_twins_but_never_the_file(tmp_path):
    before = load_protocol(SPLEEN, **_paths(tmp_path))
    changed = load_protocol(
        SPLEEN,
        **_paths(tmp_path),
        epochs=3,
        slice_size=[32, 32],
        overrides=["s1_kd:train.optimizer.lr=0.5", "students:train.batch_size=4"],
    )
    assert all(s.config.train.epochs == 3 for s in changed.stages)
    assert all(s.config.data.slice_size == [32, 32] for s in changed.stages)
    lrs = {s.name: s.config.train.optimizer.lr for s in changed.stages}
    assert lrs["s1_kd"] == lrs["s1_nokd"] == 0.5 and lrs["s2_kd"] == 1e-2
    assert changed.stage("teacher").config.train.batch_size == 8
    assert changed.stage("s2_nokd").config.train.batch_size == 4
    assert load_protocol(SPLEEN, **_paths(tmp_path)).stages[0].config == before.stages[0].config
    for bad, message in (
        ("nobody:train.epochs=2", "no stage 'nobody'"),
        ("s1_nokd:train.epochs=2", "follows it"),
        ("train.nonsense=2", "nonsense"),
        ("train.epochs", "KEY=VALUE"),
    ):
        with pytest.raises(MTKDError, match=message):
            load_protocol(SPLEEN, **_paths(tmp_path), overrides=[bad])


def test_written_configs_run_as_the_same_protocol_and_twins_stay_twins(tmp_path):
    folder = tmp_path / "mine"
    written = write_configs(load_protocol(SPLEEN, **_paths(tmp_path)), folder)
    assert [p.name for p in written] == ["protocol.yaml"] + [f"{s}.yaml" for s in THESIS_STAGES]
    stage_file = yaml.safe_load((folder / "teacher.yaml").read_text())
    assert stage_file["data"]["source"] == "../data"  # relative to the file, as a run's config
    assert stage_file["absolute_paths"]["data.source"] == str((tmp_path / "data").resolve())
    again = load_protocol(folder, **_paths(tmp_path))
    original = load_protocol(SPLEEN, **_paths(tmp_path))
    assert [s.config for s in again.stages] == [s.config for s in original.stages]
    # an edited KD stage whose twin was not edited alike is refused, naming the key
    text = (folder / "s1_kd.yaml").read_text().replace("lr: 0.01", "lr: 0.02")
    (folder / "s1_kd.yaml").write_text(text)
    with pytest.raises(MTKDError, match="s1_nokd.*train.optimizer.lr"):
        load_protocol(folder, **_paths(tmp_path))
    # placeholders left for later are filled then, and a run without them is refused
    bare = tmp_path / "bare"
    assert main(["protocol", SPLEEN, "--write-configs", str(bare)]) == 0
    assert "${DATA}" in (bare / "teacher.yaml").read_text()
    assert "${RUNS}/teacher" in (bare / "s1_kd.yaml").read_text()
    assert main(["protocol", str(bare), "--runs", str(tmp_path / "r")]) == 2


def test_protocol_refuses_a_dataset_that_is_not_msd_task09(tmp_path, capsys):
    pairs = tmp_path / "pairs"
    image, label = make_subject(0, 0, (48, 48, 16), (6.0, 6.0, 6.0)).images()
    write_image(image, pairs / "images" / "a.nii.gz")
    write_image(label, pairs / "labels" / "a.nii.gz")
    args = ["protocol", SPLEEN, "--data", str(pairs), "--runs", str(tmp_path / "runs")]
    assert main(args) == 2
    assert "expects a MSD dataset" in capsys.readouterr().err
    cohort = tmp_path / "cohort"
    write_cohort(cohort, 1, size=(48, 48, 16), spacing=(6.0, 6.0, 6.0))
    meta = json.loads((cohort / "dataset.json").read_text())
    meta["labels"] = {k: ("milz" if v == "spleen" else v) for k, v in meta["labels"].items()}
    (cohort / "dataset.json").write_text(json.dumps(meta))
    args = ["protocol", SPLEEN, "--data", str(cohort), "--runs", str(tmp_path / "runs")]
    assert main(args) == 2
    assert "needs the structure(s) spleen" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------- pooled slice Dice
def test_pooled_and_mean_slice_dice():
    reference = np.zeros((3, 4, 4), dtype=np.uint8)
    prediction = np.zeros_like(reference)
    reference[0, :2, :2] = 1  # slice 0: 4 voxels, predicted 2 of them
    prediction[0, :1, :2] = 1
    reference[1, :, :] = 1  # slice 1: 16 voxels, all predicted
    prediction[1, :, :] = 1
    prediction[2, 0, 0] = 2  # slice 2: a false positive of structure 2
    counts = slice_counts(prediction, reference, 2, axis=0)
    assert counts.slices == 3
    pooled = pooled_slice_dice(counts)
    assert pooled[0] == pytest.approx(2 * 18 / (18 + 20))
    assert pooled[1] == 0.0
    per_slice = mean_slice_dice(counts)
    assert per_slice[0] == pytest.approx((2 * 2 / 6 + 1.0) / 2)
    assert per_slice[1] == 0.0
    both = counts.extend(slice_counts(prediction, reference, 2, axis=0))
    assert both.slices == 6 and pooled_slice_dice(both) == pooled  # pooling is over voxels
    assert math.isnan(pooled_slice_dice(SliceCounts.empty(1))[0])


def test_axial_axis_follows_the_direction_matrix():
    image = sitk.Image(4, 5, 6, sitk.sitkInt16)
    assert axial_axis(image) == 0  # array (z, y, x): z is superior-inferior
    image.SetDirection((1, 0, 0, 0, 0, 1, 0, 1, 0))  # index y runs along world z
    assert axial_axis(image) == 1


# ------------------------------------------------------------------------- end to end, 2-D
@pytest.mark.slow
def test_thesis_protocol_end_to_end_on_a_task09_folder(tmp_path, capsys):
    data = spleen_task09(tmp_path / "Task09_Spleen", 6)
    runs = tmp_path / "runs"
    args = ["protocol", SPLEEN, "--data", str(data), "--runs", str(runs), "--epochs", "1"]
    args += ["--slice-size", "32", "32", "--device", "cpu"]
    for item in TINY_T1:
        args += ["--set", item]
    assert main([*args, "--stage", "students"]) == 2  # students need their teacher first
    assert "run the teacher first" in capsys.readouterr().err
    assert main(args) == 0
    report = json.loads((runs / "report.json").read_text())
    assert "pooled slice Dice" in (runs / "report.md").read_text(encoding="utf-8")
    assert "| mean HD95 mm | missed |" in (runs / "report.md").read_text(encoding="utf-8")
    assert list(report["models"]) == THESIS_STAGES
    # the split: by patient, validation from the non-test patients, students on half of train
    split = report["split"]
    train, val, test = set(split["train"]), set(split["val"]), set(split["test"])
    assert train | val | test == {f"spleen_{i + 2}" for i in range(6)}
    assert not (train & val or train & test or val & test)
    assert set(split["student_train"]) <= train
    assert len(split["student_train"]) == len(train) / 2
    for stage in THESIS_STAGES:
        run_split = json.loads((runs / stage / "split.json").read_text())
        assert run_split == split  # every stage shares the one split
        model = report["models"][stage]
        trained = set(split["student_train"] if stage != "teacher" else split["train"])
        assert set(model["train_cases"]) == trained
        training = [
            e for e in read_events(runs / stage / "events.jsonl") if e.get("state") == "training"
        ]
        assert training[0]["train_cases"] == len(trained)
        assert training[0]["val_cases"] == len(val)
        assert set(s["case"] for s in model["per_volume"]) == test
        assert 0 <= model["summary"]["spleen"]["dice"] <= 1
        assert 0 <= model["pooled_slice_dice"]["spleen"] <= 1
        assert "mean_slice_dice" in model and model["test_slices"] > 0
        assert model["distilled"] == stage.endswith("_kd")
    assert report["models"]["s1_kd"]["parameters"] == 57_297
    assert report["models"]["s2_nokd"]["parameters"] == 227_233
    # run again: every stage is skipped and the report rewritten
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("done, skipped") == 5
    # a stage stopped after its checkpoint is resumed, not restarted
    model = runs / "s1_nokd" / "model"
    for item in model.iterdir():
        item.unlink()
    model.rmdir()
    assert main(args + ["--stage", "s1_nokd"]) == 0
    out = capsys.readouterr().out
    assert "s1_nokd: resuming" in out and out.count("training (") == 0
    assert (model / "mtkd_model.json").is_file()
    # the same folders with another recipe are refused, naming the key
    assert main([*args[:7], "2", *args[8:]]) == 2
    assert "train.epochs" in capsys.readouterr().err


# ------------------------------------------------------------------------- end to end, 3-D
@pytest.mark.slow
def test_multiorgan_protocol_end_to_end_with_sliding_windows(tmp_path, monkeypatch):
    import mtkd.infer.inference as inference

    windows = []
    original = inference.predict_windows

    def counting(*a, **k):
        windows.append(tuple(a[1].shape))
        return original(*a, **k)

    monkeypatch.setattr(inference, "predict_windows", counting)
    data = tmp_path / "cohort"
    write_cohort(data, 5, seed=2, size=(48, 48, 16), spacing=(6.0, 6.0, 6.0))
    runs = tmp_path / "runs"
    args = ["protocol", MULTI, "--data", str(data), "--runs", str(runs), "--epochs", "1"]
    args += ["--patch-size", "32", "32", "16", "--device", "cpu"]
    for item in TINY_3D:
        args += ["--set", item]
    assert main(args) == 0
    assert windows  # validation ran sliding windows over volumes larger than a patch
    report = json.loads((runs / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "student_kd", "student_nokd"]
    assert report["dims"] == 3
    for model in report["models"].values():
        assert set(model["summary"]) == {
            "liver",
            "spleen",
            "kidney_left",
            "kidney_right",
            "aorta",
            "mean",
        }
        assert set(model["pooled_slice_dice"]) >= {"liver", "aorta", "mean"}
    teacher = json.loads((runs / "teacher" / "model" / "mtkd_model.json").read_text())
    assert teacher["network"]["name"] == "segresnet"
    assert teacher["network"]["reconstruction"] == "masked"
    split = report["split"]
    assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
    assert set(report["models"]["student_kd"]["train_cases"]) == set(split["student_train"])
