"""Teacher targets computed once per training image (``distill.teacher_targets``): when they
are, what they hold, how they travel with the samples and that training on them is training
on the teacher's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DATA, STRUCTURES
from helpers import untrained_model

from mtkd.config import AugmentConfig, DistillConfig, RunConfig
from mtkd.data.datasets import load_dataset
from mtkd.data.loading import PatchDataset, SliceDataset, VolumeCache
from mtkd.data.preprocess import Preprocessing
from mtkd.engine.teacher_targets import ONLINE, PRECOMPUTED, teacher_targets
from mtkd.engine.trainer import Trainer
from mtkd.errors import MTKDError
from mtkd.infer.inference import repeat_channels
from mtkd.modelfiles.model_io import load_model
from mtkd.run_folder import read_events

TINY = {"name": "thesis_unet", "params": {"channels": [4, 8], "bottleneck": 16}}
NO_INTENSITY = {"intensity_scale": 0.0, "intensity_shift": 0.0, "noise_std": 0.0}


def quiet(config: dict, run_dir: Path) -> Trainer:
    return Trainer(RunConfig.from_dict(config), run_dir, progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """An untrained tiny 2-D model of the student's structures."""
    return untrained_model(tmp_path_factory.mktemp("teacher") / "model", tuple(STRUCTURES), seed=3)


@pytest.fixture(scope="module")
def wider_teacher(tmp_path_factory) -> Path:
    """A teacher of more structures than the student, in another order (matched by name)."""
    names = ("stomach", *reversed(STRUCTURES), "pancreas")
    return untrained_model(tmp_path_factory.mktemp("wide") / "model", names, seed=4)


def hinton(make_config, teacher: Path, targets: str, **distill) -> dict:
    """A one-epoch Hinton KD config (the output term alone) on the slab dataset."""
    return make_config(
        "distill",
        name="kd",
        model=TINY,
        train_on="student_train",
        data__augment=NO_INTENSITY,
        distill={
            "teacher": str(teacher),
            "preset": "hinton_published",
            "unlabelled": "train",
            "teacher_targets": targets,
            **distill,
        },
        train={"epochs": 1, "batch_size": 4, "optimizer": {"name": "adamw", "lr": 1e-2}},
    )


def _metrics(run_dir: Path) -> dict:
    (metrics,) = [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "metrics"]
    return metrics


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"preset": "hinton_published"}, ONLINE),  # the default: online
        ({"preset": "hinton_published", "teacher_targets": "auto"}, PRECOMPUTED),
        ({"preset": "cwd_published", "teacher_targets": "precomputed"}, PRECOMPUTED),
        ({"preset": "thesis", "teacher_targets": "auto"}, ONLINE),  # feature terms weigh
        (
            {
                "preset": "thesis",
                "scale_weights": {"E-E": 0, "B-B": 0, "D-D": 0},
                "teacher_targets": "auto",
            },
            PRECOMPUTED,
        ),  # fmt: skip
        ({"preset": "hinton_published", "scale": 0.0, "teacher_targets": "auto"}, ONLINE),
    ],
)
def test_when_the_teacher_targets_are_precomputed(section, expected):
    assert teacher_targets(DistillConfig(teacher="t", **section), stored_teacher=False) == expected


def test_stored_outputs_and_feature_terms_are_not_precomputed():
    hinton_auto = DistillConfig(teacher="t", preset="hinton_published", teacher_targets="auto")
    assert teacher_targets(hinton_auto, stored_teacher=True) == ONLINE
    assert teacher_targets(None, stored_teacher=False) == ONLINE
    thesis = DistillConfig(teacher="t", preset="thesis", teacher_targets="precomputed")
    with pytest.raises(MTKDError, match=r"teacher_targets: precomputed.*E-E, B-B, D-D"):
        teacher_targets(thesis, stored_teacher=False)


def test_a_run_asking_precomputed_targets_with_feature_terms_is_refused(
    make_config, teacher, tmp_path
):
    config = hinton(make_config, teacher, "precomputed", preset="thesis")
    with pytest.raises(MTKDError, match="teacher_targets: precomputed"):
        quiet(config, tmp_path / "run").run()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("which", ["teacher", "wider_teacher"])
def test_precomputed_targets_are_the_teachers_logits_of_every_training_slice(
    make_config, which, request, tmp_path
):
    """Every training image, labelled or not, carries (C, X, Y, Z) float16 logits equal to
    what the distiller compares online: the teacher's logits of each slice (name-matched
    pseudo-logits for a teacher of other structures)."""
    teacher_path = request.getfixturevalue(which)
    trainer = quiet(hinton(make_config, teacher_path, "precomputed"), tmp_path / "run")
    trainer.run()
    data = trainer.data
    assert data.cache.teacher_logits and trainer.models.distiller.teacher is None
    assert data.unlabelled_ids, "the unlabelled training images get targets too"
    model = load_model(teacher_path)
    online = _online_transform(model, trainer)
    for case_id in data.train_ids + data.unlabelled_ids:
        case = data.cache[case_id]
        slices = case.image.permute(3, 0, 1, 2)  # (Z, 1, X, Y)
        with torch.no_grad():
            expected = online(model.network(repeat_channels(slices, model.prep.in_channels)))
        assert case.teacher.dtype == torch.float16
        assert case.teacher.shape == (len(STRUCTURES) + 1, *case.image.shape[1:])
        torch.testing.assert_close(
            case.teacher.float().permute(3, 0, 1, 2), expected, atol=2e-2, rtol=1e-2
        )


def _online_transform(model, trainer):
    """What the online distiller does to the teacher's logits for this run."""
    from mtkd.engine.teacher_source import teacher_transform

    transform = teacher_transform(model, trainer.data.labels, trainer.data.activation)
    return (lambda logits: logits) if transform is None else transform


def test_training_on_precomputed_targets_is_training_on_the_teachers_logits(
    make_config, teacher, tmp_path
):
    """Whole slices, no intensity augmentation: the teacher sees the same input both ways, so
    the epoch's terms agree up to the float16 storage of the logits; the default runs the
    teacher on every batch."""
    online = quiet(hinton(make_config, teacher, "online"), tmp_path / "online")
    online.run()
    assert not online.data.cache.teacher_logits and online.models.distiller.teacher is not None
    quiet(hinton(make_config, teacher, "precomputed"), tmp_path / "pre").run()
    first, second = _metrics(tmp_path / "online"), _metrics(tmp_path / "pre")
    assert first["pmd"] > 0
    for term in ("loss", "seg", "pmd"):
        assert second[term] == pytest.approx(first[term], rel=2e-3), term


def test_precomputed_logits_travel_with_the_patch_and_its_flips(slab_dataset, teacher):
    """A 3-D patch's teacher logits are cut at the image's place and flipped with it: logits
    equal to the image stay equal to the image patch."""
    folder, split = slab_dataset
    dataset = load_dataset(folder, labels_json=DATA / "labels_total_v2.json")
    _, mapping = dataset.labels.select(STRUCTURES)
    prep = Preprocessing.from_config(
        RunConfig.from_dict(
            {
                "data": {
                    "source": str(folder),
                    "dims": 3,
                    "patch_size": [16, 16, 8],
                    "hu_window": [-160.0, 240.0],
                }
            }  # fmt: skip
        ).data
    )
    cache = VolumeCache(dataset.cases, dataset.labels, mapping, prep, teacher_logits=True)
    case_id = split["train"][0]
    image = cache[case_id].image
    cache.attach_teacher_logits(case_id, image.repeat(3, 1, 1, 1))
    augment = AugmentConfig(flip_prob=0.5, **NO_INTENSITY)
    patches = PatchDataset(cache, [case_id], (16, 16, 8), len(STRUCTURES) + 1, 8, augment)
    patches.reseed(0)
    for index in range(len(patches)):
        item = patches[index]
        assert item["teacher"].shape == (3, 16, 16, 8) and item["teacher"].dtype == torch.float32
        for channel in item["teacher"]:
            torch.testing.assert_close(channel, item["image"][0].half().float())
    slices = SliceDataset(cache, [case_id], augment)
    item = slices[0]
    torch.testing.assert_close(item["teacher"][1], item["image"][0].half().float())
    with pytest.raises(ValueError, match="do not match the image"):
        cache.attach_teacher_logits(case_id, image[..., :-1].repeat(3, 1, 1, 1))
