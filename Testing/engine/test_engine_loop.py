"""The engine for the annotate-then-distill loop: fine-tuning from a previous model
(``model.init_from``), the process identity in the first status event, and the tap-pair
presets and overrides (``all_scales``, ``feature_loss``, ``scale_weights``)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from helpers import expect_error, stop_at_batch

from mtkd.config import RunConfig, load_config
from mtkd.distill.presets import PRESETS, feature_weights, resolve_terms
from mtkd.engine.teacher_source import TeacherSource, check_feature_terms
from mtkd.engine.trainer import Trainer, TrainingInterrupted, resume_run
from mtkd.errors import MTKDError
from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.modelfiles.model_io import load_model
from mtkd.models import network_info
from mtkd.run_folder import read_events

S1 = {"name": "thesis_s1", "params": {}, "reconstruction": "none"}
T1 = {"name": "thesis_t1_backbone", "params": {}, "reconstruction": "masked"}
TEACHER_NET = {"name": "thesis_unet", "params": {"channels": [4, 8], "bottleneck": 16}}


def quiet(config: dict, run_dir, **options) -> Trainer:
    return Trainer(
        RunConfig.from_dict(config), run_dir, progress=False, log=lambda _: None, **options
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(folder) / "model.pt", weights_only=True)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def distill_config(make_config, teacher_run, **distill) -> dict:
    return make_config(
        "distill",
        name="student",
        model={"name": "thesis_s1", "params": {}},
        train_on="student_train",
        train__epochs=1,
        distill={"teacher": str(teacher_run), **distill},
    )


@pytest.fixture(scope="module")
def plain_student(slab_dataset, tmp_path_factory) -> Path:
    """A tiny S1 student trained without distillation for one epoch (its run folder)."""
    run_dir = tmp_path_factory.mktemp("loop") / "plain_s1"
    config = tiny_config(
        slab_dataset,
        "train",
        name="plain_s1",
        model={"name": "thesis_s1", "params": {}},
        multitask={"reconstruction": "none"},
        train_on="student_train",
        train__epochs=1,
    )
    quiet(config, run_dir).run()
    return run_dir


# ------------------------------------------------------------------ init_from


def test_init_from_loads_the_previous_weights_before_training(teacher_run, make_config, tmp_path):
    """The new network holds the previous model's weights before its first step, and their
    validation on this run equals the previous run's best validation (same cases, same
    weights), recorded in the events, the metrics and the lineage."""
    config = make_config(
        "train",
        name="finetuned",
        model={**TEACHER_NET, "init_from": str(teacher_run)},
        train__epochs=1,
    )
    previous = load_model(teacher_run)

    # the prepared network, before any step: the previous weights, not a fresh initialisation
    trainer = quiet(config, tmp_path / "prepared")
    trainer.run_dir.create(trainer.config)
    trainer._prepare_data()
    trainer._prepare_model()
    assert same_weights(trainer.models.network.state_dict(), previous.network.state_dict())
    fresh = quiet(make_config("train", name="fresh"), tmp_path / "fresh")
    fresh.run_dir.create(fresh.config)
    fresh._prepare_data()
    fresh._prepare_model()
    assert not same_weights(fresh.models.network.state_dict(), previous.network.state_dict())

    result = quiet(config, tmp_path / "run").run()
    expected = previous.metadata["metrics"]["best_val_dice"]
    assert result.initial_val_dice == pytest.approx(expected, abs=1e-6)
    events = read_events(tmp_path / "run" / "events.jsonl")
    initial = [e for e in events if e.get("state") == "initial_validation"]
    assert len(initial) == 1 and initial[0]["val_dice"] == pytest.approx(expected, abs=1e-6)
    states = [e.get("state") for e in events if e["type"] == "status"]
    assert states.index("initial_validation") < states.index("training")
    first_metrics = next(i for i, e in enumerate(events) if e["type"] == "metrics")
    assert events.index(initial[0]) < first_metrics
    done = events[-1]
    assert done["type"] == "done" and done["initial_val_dice"] == initial[0]["val_dice"]
    meta = load_model(result.model_dir).metadata
    assert meta["metrics"]["initial_val_dice"] == initial[0]["val_dice"]
    assert meta["lineage"]["previous"] == {
        "path": str((teacher_run / "model").resolve()),
        "name": previous.name,
        "weights_sha256": previous.metadata["weights_sha256"],
        "val_dice_on_this_run": initial[0]["val_dice"],
    }
    # and training then moves away from them
    assert not same_weights(weights(result.model_dir), weights(teacher_run / "model"))


def test_without_init_from_there_is_no_initial_validation(teacher_run):
    events = read_events(teacher_run / "events.jsonl")
    assert not any(e.get("state") == "initial_validation" for e in events)
    assert events[-1]["initial_val_dice"] is None
    meta = load_model(teacher_run).metadata
    assert meta["metrics"]["initial_val_dice"] is None and "previous" not in meta["lineage"]


def test_init_from_works_for_distillation(teacher_run, plain_student, make_config, tmp_path):
    config = distill_config(make_config, teacher_run, preset="thesis")
    config["model"]["init_from"] = str(plain_student / "model")
    result = quiet(config, tmp_path / "kd").run()
    previous = load_model(plain_student)
    assert result.initial_val_dice == pytest.approx(
        previous.metadata["metrics"]["best_val_dice"], abs=1e-6
    )
    lineage = load_model(result.model_dir).metadata["lineage"]
    assert lineage["distilled"] and lineage["teacher"]["kind"] == "run"
    assert lineage["previous"]["weights_sha256"] == previous.metadata["weights_sha256"]
    assert lineage["previous"]["val_dice_on_this_run"] == result.initial_val_dice


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            {"model": {"name": "thesis_unet", "params": {"channels": [8, 16], "bottleneck": 16}}},
            ["network differs", "channels", "[4, 8]", "[8, 16]"],
        ),
        (
            {"model": {"name": "thesis_s1", "params": {}}},
            ["network differs", "thesis_unet", "thesis_s1"],
        ),
        ({"multitask": {"reconstruction": "none"}}, ["network differs", "reconstruction"]),
        (
            {"data__structures": ["spleen", "liver", "kidney_right"]},
            ["labels differ", "['liver', 'spleen', 'kidney_right']"],
        ),
    ],
)
def test_init_from_refuses_another_network_or_other_labels(
    teacher_run, make_config, tmp_path, overrides, words
):
    config = make_config("train", name="ft", **{"model": dict(TEACHER_NET), **overrides})
    config["model"]["init_from"] = str(teacher_run)
    with expect_error(teacher_run / "model", "model.init_from", *words):
        quiet(config, tmp_path / "ft").run()
    assert not (tmp_path / "ft" / "checkpoints" / "last.pt").exists()
    assert read_events(tmp_path / "ft" / "events.jsonl")[-1]["type"] == "error"


def test_init_from_a_missing_or_tampered_model_is_refused(teacher_run, make_config, tmp_path):
    config = make_config("train", model={**TEACHER_NET, "init_from": str(tmp_path / "nope")})
    with expect_error(tmp_path / "nope", "not found"):
        quiet(config, tmp_path / "a").run()
    copy = tmp_path / "copy"
    shutil.copytree(teacher_run / "model", copy)
    state = weights(copy)
    first = next(iter(state))
    state[first] = state[first] + 1
    torch.save(state, copy / "model.pt")
    config["model"]["init_from"] = str(copy)
    with expect_error(copy / "model.pt", "SHA-256"):
        quiet(config, tmp_path / "b").run()


def test_resuming_an_init_from_run_takes_everything_from_its_checkpoint(
    teacher_run, make_config, tmp_path
):
    """Stopped inside its epoch and resumed after the previous model is gone: the same
    weights as one straight run, one initial validation, its Dice and the lineage kept."""
    straight_from, stopped_from = tmp_path / "prev_a", tmp_path / "prev_b"
    shutil.copytree(teacher_run / "model", straight_from)
    shutil.copytree(teacher_run / "model", stopped_from)
    config = make_config("train", name="ft", model=dict(TEACHER_NET), train__epochs=1)
    config["model"]["init_from"] = str(straight_from)
    straight = quiet(config, tmp_path / "straight").run()

    config["model"]["init_from"] = str(stopped_from)
    trainer = quiet(config, tmp_path / "stopped")
    stop_at_batch(trainer, 3)  # of the 7 batches of the epoch
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    state = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 3)
    assert state["initial_val_dice"] == straight.initial_val_dice
    shutil.rmtree(stopped_from)  # a resume that reloaded the previous model would fail

    resumed = resume_run(tmp_path / "stopped", progress=False, log=lambda _: None)
    assert same_weights(weights(straight.model_dir), weights(resumed.model_dir))
    assert resumed.initial_val_dice == straight.initial_val_dice is not None
    events = read_events(tmp_path / "stopped" / "events.jsonl")
    assert sum(e.get("state") == "initial_validation" for e in events) == 1
    assert events[-1]["initial_val_dice"] == straight.initial_val_dice
    meta = load_model(resumed.model_dir).metadata
    assert meta["metrics"]["initial_val_dice"] == straight.initial_val_dice
    assert meta["lineage"]["previous"]["path"] == str(stopped_from.resolve())
    assert meta["lineage"]["previous"]["val_dice_on_this_run"] == straight.initial_val_dice


# ------------------------------------------------------------ process identity


def test_the_first_status_event_names_the_process(teacher_run):
    first = read_events(teacher_run / "events.jsonl")[0]
    assert first["type"] == "status" and first["state"] == "preparing"
    assert first["pid"] == os.getpid()
    assert first["host"] == socket.gethostname()
    assert first["argv"] == sys.argv


# ---------------------------------------------------------- presets, overrides


def test_all_scales_pairs_every_shared_encoder_level():
    assert "all_scales" in PRESETS and "thesis" in PRESETS
    config = RunConfig.from_dict(
        {"kind": "distill", "distill": {"teacher": "t", "preset": "all_scales"}}
    ).distill
    pairs, output = resolve_terms(config, S1, T1)
    student, teacher = network_info("thesis_s1"), network_info("thesis_t1_backbone")
    depth = min(len(student.encoder_taps), len(teacher.encoder_taps))
    assert depth == 2 < len(teacher.encoder_taps)
    expected = [
        (f"E{k}-E{k}", student.encoder_taps[k - 1], "backbone." + teacher.encoder_taps[k - 1])
        for k in range(1, depth + 1)
    ]
    expected += [
        ("B-B", student.bottleneck_tap, "backbone." + teacher.bottleneck_tap),
        ("D-D", student.decoder_tap, "backbone." + teacher.decoder_tap),
    ]
    assert [(p.name, p.student, p.teacher) for p in pairs] == expected
    assert [p.weight for p in pairs] == [0.1, 0.1, 0.2, 0.1]
    assert {(p.loss, p.temperature) for p in pairs} == {("infonce", 0.4)}
    assert (output.loss, output.weight, output.temperature) == ("pmd", 0.2, 4.0)
    # the teacher with the student's depth: every level; a plain teacher: no "backbone."
    deep = {"name": "thesis_unet", "params": {"channels": [4, 8, 16, 32]}}
    pairs, _ = resolve_terms(config, deep, {**deep, "reconstruction": "none"})
    assert [p.name for p in pairs] == ["E1-E1", "E2-E2", "E3-E3", "E4-E4", "B-B", "D-D"]
    assert pairs[2].student == pairs[2].teacher == "enc3"
    assert feature_weights(config, S1, T1) == {
        p.name: p.weight for p in resolve_terms(config, S1, T1)[0]
    }


def test_feature_loss_and_scale_weights_replace_the_preset_values():
    config = RunConfig.from_dict(
        {
            "kind": "distill",
            "distill": {
                "teacher": "t",
                "preset": "thesis",
                "feature_loss": "mse",
                "scale_weights": {"B-B": 0.5, "D-D": 0},
                "scale": 0.5,
            },
        }
    ).distill
    pairs, output = resolve_terms(config, S1, T1)
    assert [(p.name, p.loss, p.weight) for p in pairs] == [
        ("E-E", "mse", 0.1 * 0.5),
        ("B-B", "mse", 0.5 * 0.5),  # scale_weights first, then scale
    ]  # D-D dropped
    assert output.weight == 0.2 * 0.5  # the output term keeps its weight
    assert feature_weights(config) == {"E-E": 0.05, "B-B": 0.25}
    config.preset, config.scale_weights = "all_scales", {"E2-E2": 0.3, "B-B": 0}
    pairs, _ = resolve_terms(config, S1, T1)
    assert [(p.name, p.weight) for p in pairs] == [("E1-E1", 0.05), ("E2-E2", 0.15), ("D-D", 0.05)]
    assert feature_weights(config, S1, T1) == {"E1-E1": 0.05, "E2-E2": 0.15, "D-D": 0.05}
    # without the networks the depth is unknown: the unnamed encoder levels are "Ek-Ek"
    assert feature_weights(config) == {"E2-E2": 0.15, "Ek-Ek": 0.05, "D-D": 0.05}


def test_feature_terms_of_the_new_preset_are_refused_for_a_teacher_without_taps(tmp_path):
    stored = TeacherSource(tmp_path, "stored")
    config = RunConfig.from_dict(
        {"kind": "distill", "distill": {"teacher": "t", "preset": "all_scales"}}
    ).distill
    with expect_error(tmp_path, "Ek-Ek", "B-B", "D-D", "stored outputs"):
        check_feature_terms(stored, config)
    config.scale = 0.0  # the no-KD baseline needs no taps
    check_feature_terms(stored, config)


def test_all_scales_distillation_trains_its_pairs(teacher_run, make_config, tmp_path):
    config = distill_config(
        make_config,
        teacher_run,
        preset="all_scales",
        feature_loss="cosine",
        scale_weights={"E1-E1": 0.0, "E2-E2": 0.3},
    )
    trainer = quiet(config, tmp_path / "kd")
    trainer.run()
    assert [
        (p.name, p.student, p.teacher, p.loss, p.weight) for p in trainer.models.distiller.pairs
    ] == [
        ("E2-E2", "enc2", "backbone.enc2", "cosine", 0.3),
        ("B-B", "bottleneck", "backbone.bottleneck", "cosine", 0.2),
        ("D-D", "dec2", "backbone.dec2", "cosine", 0.1),
    ]
    metrics = [e for e in read_events(tmp_path / "kd" / "events.jsonl") if e["type"] == "metrics"]
    assert all(metrics[0][term] > 0 for term in ("E2-E2", "B-B", "D-D", "pmd"))
    assert "E1-E1" not in metrics[0]
    state = load_checkpoint(tmp_path / "kd" / "checkpoints" / "last.pt")
    assert {key.split(".")[0] for key in state["connectors"]} <= {"E2-E2", "B-B", "D-D"}


@pytest.mark.parametrize(
    ("distill", "words"),
    [
        ({"preset": "thesis", "scale_weights": {"E2-E2": 0.1}}, ["'E2-E2'", "E-E, B-B, D-D"]),
        ({"preset": "all_scales", "scale_weights": {"E-E": 0.1}}, ["'E-E'", "E1-E1", "B-B"]),
        (
            {"preset": "all_scales", "scale_weights": {"E3-E3": 0.1}},
            ["'E3-E3'", "these networks", "E1-E1, E2-E2, B-B, D-D"],
        ),
        ({"preset": "thesis", "feature_loss": "l7"}, ["distill.feature_loss", "l7", "cosine"]),
        ({"preset": "all_scales", "scale_weights": {"B-B": "x"}}, ["distill.scale_weights.B-B"]),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(
    teacher_run, make_config, tmp_path, distill, words
):
    config = distill_config(make_config, teacher_run, **distill)
    with pytest.raises(MTKDError) as error:
        quiet(config, tmp_path / "bad").run()
    for word in words:
        assert word in str(error.value), str(error.value)
    assert not (tmp_path / "bad" / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            "distill: {teacher: t, feature_loss: mse, pairs: [{student: a, teacher: b}]}\n",
            "distill.feature_loss",
        ),
        ("distill: {teacher: t, scale_weights: {B-B: 0.1}}\n", "distill.scale_weights"),
        (
            "distill: {teacher: t, preset: thesis, scale_weights: {B-B: -1}}\n",
            "distill.scale_weights.B-B",
        ),
        ("distill: {teacher: t, preset: thesis, scale_weights: [1]}\n", "distill.scale_weights"),
        ("model: {name: thesis_s1, init_from: ' '}\n", "model.init_from"),
        ("model: {name: thesis_s1, init_from: 3}\n", "model.init_from"),
    ],
)
def test_bad_new_config_values_name_the_key_and_the_file(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with expect_error(path, f"'{key}'"):
        load_config(path)
