"""3-D patches with MONAI networks: a multi-task SegResNet teacher distilled into a MONAI UNet
with the registry's E/B/D taps, then sliding-window segmentation on the input grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mtkd.config import RunConfig
from mtkd.data.image_io import write_image
from mtkd.engine.trainer import Trainer
from mtkd.infer.inference import KEEP_LOGITS, predict_volume
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import load_model
from mtkd.run_folder import read_events

# (index, size) of three blocks of the real abdomen CT around the kidneys and liver
BLOCKS = [([20, 20, 66], [72, 64, 12]), ([24, 18, 80], [72, 64, 12]), ([22, 22, 94], [72, 64, 12])]


@pytest.fixture(scope="module")
def volume_dataset(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("blocks")
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    label = sitk.ReadImage(str(data_dir / "abdomen_seg_total_fast.nii.gz"))
    for number, (index, size) in enumerate(BLOCKS):
        for kind, volume in (("images", image), ("labels", label)):
            (folder / kind).mkdir(exist_ok=True)
            write_image(
                sitk.RegionOfInterest(volume, size, index), folder / kind / f"b{number}.nii.gz"
            )
    return folder, {"train": ["b0", "b2"], "val": ["b1"], "test": []}


def config_3d(volume_dataset, data_dir, kind, model, **extra):
    folder, split = volume_dataset
    return RunConfig.from_dict(
        {
            "kind": kind,
            "name": f"3d-{kind}",
            "data": {
                "source": str(folder),
                "labels_json": str(data_dir / "labels_total_v2.json"),
                "structures": ["liver", "kidney_right"],
                "dims": 3,
                "spacing": [4.0, 4.0, 4.0],
                "patch_size": [32, 32, 16],
                "patches_per_volume": 2,
            },
            "split": {"fixed": split},
            "model": model,
            "train": {"epochs": 1, "batch_size": 2, "optimizer": {"lr": 1e-3}},
            **extra,
        }
    )


def test_3d_teacher_student_and_sliding_window(volume_dataset, data_dir, tmp_path):
    teacher = config_3d(
        volume_dataset,
        data_dir,
        "train",
        {
            "name": "segresnet",
            "params": {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
        },
        multitask={"reconstruction": "masked", "mask_patch": 4},
    )
    Trainer(teacher, tmp_path / "teacher", progress=False, log=lambda _: None).run()
    student = config_3d(
        volume_dataset,
        data_dir,
        "distill",
        {"name": "unet", "params": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}},
        distill={"teacher": str(tmp_path / "teacher"), "preset": "thesis"},
    )
    Trainer(student, tmp_path / "student", progress=False, log=lambda _: None).run()
    metrics = [
        e for e in read_events(tmp_path / "student" / "events.jsonl") if e["type"] == "metrics"
    ]
    assert all(metrics[0][term] > 0 for term in ("E-E", "B-B", "D-D", "pmd"))
    assert 0.0 <= metrics[0]["val_dice"] <= 1.0

    _check_precomputed_teacher_targets(volume_dataset, data_dir, tmp_path)

    model = load_model(tmp_path / "student")
    assert model.prep.dims == 3 and model.metadata["network"]["name"] == "unet"
    image = sitk.ReadImage(str(volume_dataset[0] / "images" / "b1.nii.gz"))
    prediction = Predictor(model).predict(image)  # larger than one patch: sliding window
    assert prediction.labelmap.GetSize() == image.GetSize()
    assert np.allclose(prediction.labelmap.GetOrigin(), image.GetOrigin())
    assert set(np.unique(sitk.GetArrayViewFromImage(prediction.labelmap))) <= {0, 1, 2}


def _check_precomputed_teacher_targets(volume_dataset, data_dir, tmp_path):
    """Hinton KD with ``teacher_targets: precomputed``: each training volume carries the
    teacher's sliding-window logits over its whole grid, and the student trains on them."""
    config = config_3d(
        volume_dataset,
        data_dir,
        "distill",
        {"name": "unet", "params": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}},
        distill={
            "teacher": str(tmp_path / "teacher"),
            "preset": "hinton_published",
            "teacher_targets": "precomputed",
        },
    )
    trainer = Trainer(config, tmp_path / "precomputed", progress=False, log=lambda _: None)
    trainer.run()
    teacher = load_model(tmp_path / "teacher")
    for case_id in trainer.data.train_ids:
        case = trainer.data.cache[case_id]
        spatial, patch = case.image.shape[1:], config.data.patch_size
        assert any(s > p for s, p in zip(spatial, patch, strict=True))  # several windows
        expected = predict_volume(
            teacher.network, case.image, teacher.prep, KEEP_LOGITS, torch.device("cpu")
        )
        torch.testing.assert_close(case.teacher.float(), expected, atol=2e-2, rtol=1e-2)
    (metrics,) = [
        e for e in read_events(tmp_path / "precomputed" / "events.jsonl") if e["type"] == "metrics"
    ]
    assert metrics["pmd"] > 0
