"""The training loop and the run folder: teacher, distillation, no-KD baseline, resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import stop_at_batch

from mtkd.config import RunConfig
from mtkd.engine.trainer import Trainer, TrainingInterrupted, resume_run
from mtkd.errors import MTKDError
from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.modelfiles.model_io import load_model
from mtkd.run_folder import read_events


def quiet(config: dict, run_dir, **options):
    return Trainer(
        RunConfig.from_dict(config), run_dir, progress=False, log=lambda _: None, **options
    )


def test_teacher_run_folder_holds_everything(teacher_run):
    for name in ("config.yaml", "split.json", "events.jsonl", "checkpoints/last.pt"):
        assert (teacher_run / name).is_file(), name
    events = read_events(teacher_run / "events.jsonl")
    kinds = [event["type"] for event in events]
    assert kinds[0] == "status" and kinds[-1] == "done"
    metrics = [event for event in events if event["type"] == "metrics"]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all("reconstruction" in m and "seg" in m and "val_dice" in m for m in metrics)
    model = load_model(teacher_run)
    meta = model.metadata
    assert meta["labels"] == {"1": "liver", "2": "spleen", "3": "kidney_right"}
    assert meta["network"]["reconstruction"] == "masked"
    assert model.network.mask_patch == 4 and model.network.mask_ratio == 0.5  # from the config
    assert meta["preprocessing"]["hu_window"] == [-160.0, 240.0]
    assert meta["lineage"]["kind"] == "train"
    state = load_checkpoint(teacher_run / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["connectors"] is None


def test_distilled_student_records_lineage_and_connectors(teacher_run, make_config, tmp_path):
    config = make_config(
        "distill",
        name="student",
        model={"name": "thesis_s1", "params": {}},
        train_on="student_train",
        distill={"teacher": str(teacher_run), "preset": "thesis"},
    )
    result = quiet(config, tmp_path / "kd").run()
    events = read_events(tmp_path / "kd" / "events.jsonl")
    metrics = [e for e in events if e["type"] == "metrics"]
    assert {"E-E", "B-B", "D-D", "pmd", "seg"} <= set(metrics[0])
    assert all(metrics[0][term] > 0 for term in ("E-E", "B-B", "D-D", "pmd"))
    state = load_checkpoint(tmp_path / "kd" / "checkpoints" / "last.pt")
    assert set(state["connectors"]) and all(
        k.split(".")[0] in {"E-E", "B-B", "D-D"} for k in state["connectors"]
    )
    student = load_model(result.model_dir)
    assert (
        student.metadata["lineage"]["teacher"]["weights_sha256"]
        == load_model(teacher_run).metadata["weights_sha256"]
    )
    # the exported student is the plain network: no connector weights in it
    exported = torch.load(result.model_dir / "model.pt", weights_only=True)
    assert not any("connector" in key for key in exported)
    assert student.metadata["parameters"] == sum(p.numel() for p in student.network.parameters())


def test_student_trains_on_its_fraction_of_the_training_patients(teacher_run):
    split = json.loads((teacher_run / "split.json").read_text())
    assert set(split["student_train"]) < set(split["train"])
    assert (
        len(split["student_train"]) == round(len(split["train"]) / 2)
        or len(split["student_train"]) == len(split["train"]) // 2
    )


def test_no_kd_baseline_is_the_same_recipe_with_zero_weights(teacher_run, make_config, tmp_path):
    """A distillation run with every weight at zero equals plain training, bit for bit."""
    common = dict(model={"name": "thesis_s1", "params": {}}, train_on="student_train")
    zero = make_config(
        "distill", distill={"teacher": str(teacher_run), "preset": "thesis", "scale": 0.0}, **common
    )
    plain = make_config("train", multitask={"reconstruction": "none"}, **common)
    quiet(zero, tmp_path / "zero").run()
    quiet(plain, tmp_path / "plain").run()
    a = torch.load(tmp_path / "zero" / "model" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "plain" / "model" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and real distillation changes the result
    kd = make_config("distill", distill={"teacher": str(teacher_run), "preset": "thesis"}, **common)
    quiet(kd, tmp_path / "kd").run()
    c = torch.load(tmp_path / "kd" / "model" / "model.pt", weights_only=True)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("batch", [7, 10])  # 7 batches an epoch: a boundary, mid-epoch 2
def test_resume_continues_exactly(make_config, tmp_path, batch):
    """Stopped (as by SIGINT) at an epoch boundary or inside an epoch, then resumed: the same
    weights as one straight run."""
    config = make_config("train", multitask={"reconstruction": "none"}, train__epochs=3)
    quiet(config, tmp_path / "straight").run()

    trainer = quiet(config, tmp_path / "stopped")
    stop_at_batch(trainer, batch)
    with pytest.raises(TrainingInterrupted, match="resume"):
        trainer.run()
    state = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == divmod(batch, 7)
    resume_run(tmp_path / "stopped", progress=False, log=lambda _: None)
    a = torch.load(tmp_path / "straight" / "model" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "model" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_or_with_corrupt_checkpoint_is_an_error(make_config, tmp_path):
    config = make_config("train", multitask={"reconstruction": "none"}, train__epochs=1)
    quiet(config, tmp_path / "run").run()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(MTKDError, match="corrupt"):
        resume_run(tmp_path / "run", progress=False)
    last.unlink()
    with pytest.raises(MTKDError, match="no checkpoint"):
        resume_run(tmp_path / "run", progress=False)


def test_an_existing_run_is_never_overwritten(make_config, tmp_path):
    config = make_config("train", multitask={"reconstruction": "none"}, train__epochs=1)
    quiet(config, tmp_path / "run").run()
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(MTKDError, match="already holds a run"):
        quiet(config, tmp_path / "run").run()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model": {"name": "no_such_net", "params": {}}}, "no_such_net"),
        (
            {
                "distill": {
                    "teacher": "TEACHER",
                    "pairs": [{"student": "enc9", "teacher": "backbone.enc2"}],
                }
            },
            "enc9",
        ),
        (
            {
                "distill": {
                    "teacher": "TEACHER",
                    "pairs": [{"student": "enc2", "teacher": "backbone.enc2", "loss": "l7"}],
                }
            },
            "l7",
        ),
        (
            {
                "distill": {
                    "teacher": "TEACHER",
                    "pairs": [{"student": "enc2", "teacher": "backbone.enc9"}],
                }
            },
            "backbone.enc9",
        ),
    ],
)
def test_bad_names_in_the_config_are_clear_errors(
    teacher_run, make_config, tmp_path, override, message
):
    config = make_config(
        "distill",
        model={"name": "thesis_s1", "params": {}},
        distill={"teacher": str(teacher_run), "preset": "thesis"},
    )
    for key, value in override.items():
        if key == "distill":
            value = {**value, "teacher": str(teacher_run)}
        config[key] = value
    with pytest.raises(MTKDError, match=message):
        quiet(config, tmp_path / "bad").run()
    assert not (tmp_path / "bad" / "checkpoints" / "last.pt").exists()


def test_a_run_that_failed_before_its_first_checkpoint_can_be_started_again(make_config, tmp_path):
    bad = make_config("train", model={"name": "no_such_net", "params": {}})
    with pytest.raises(MTKDError, match="no_such_net"):
        quiet(bad, tmp_path / "run").run()
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert events[-1]["type"] == "error" and "no_such_net" in events[-1]["message"]
    good = make_config("train", multitask={"reconstruction": "none"}, train__epochs=1)
    quiet(good, tmp_path / "run").run()
    assert read_events(tmp_path / "run" / "events.jsonl")[-1]["type"] == "done"


def _spoil(label_path, how: str) -> None:
    import SimpleITK as sitk

    label = sitk.ReadImage(str(label_path))
    if how == "grid":
        label.SetOrigin([v + 5.0 for v in label.GetOrigin()])
    elif how == "value":
        label[2, 2, 1] = 200  # not a class of labels_total_v2.json
    elif how == "empty":
        label = label * 0
    sitk.WriteImage(label, str(label_path))


@pytest.mark.parametrize(
    ("how", "problem"), [("grid", "grid"), ("value", "200"), ("empty", "empty")]
)
def test_a_bad_case_stops_the_run_naming_its_file(
    slab_dataset, make_config, tmp_path, how, problem
):
    import shutil

    folder, split = slab_dataset
    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    bad = copy / "labels" / f"{split['train'][1]}.nii.gz"
    _spoil(bad, how)
    config = make_config("train", multitask={"reconstruction": "none"}, train__epochs=1)
    config["data"]["source"] = str(copy)
    with pytest.raises(MTKDError) as error:
        quiet(config, tmp_path / "run").run()
    assert str(bad) in str(error.value) and problem in str(error.value).lower()
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert events[-1]["type"] == "error" and str(bad) in events[-1]["message"]
