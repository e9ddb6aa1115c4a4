"""Shared fixtures: a small slab dataset cut from the bundled real CT, tiny run configs,
and one tiny trained teacher reused by the tests that need a model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
"""The repository."""
DATA = Path(__file__).resolve().parent / "Data"
"""The bundled real CT files and their licences."""
STRUCTURES = ["liver", "spleen", "kidney_right"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def slab_dataset(tmp_path_factory) -> tuple[Path, dict]:
    """Folder-pairs dataset of 5-slice slabs of the real abdomen CT, and its fixed split."""
    from mtkd.demo import write_slab_dataset

    folder = tmp_path_factory.mktemp("slabs")
    _, split = write_slab_dataset(
        DATA / "abdomen_ct.nii.gz",
        DATA / "abdomen_seg_total_fast.nii.gz",
        DATA / "labels_total_v2.json",
        folder,
    )
    return folder, split


def tiny_config(dataset: tuple[Path, dict], kind: str = "train", **overrides) -> dict:
    """A run config (as a dict) small enough for a CPU test: 32x32 slices, tiny nets."""
    folder, split = dataset
    config = {
        "kind": kind,
        "name": f"tiny-{kind}",
        "data": {
            "source": str(folder),
            "labels_json": str(DATA / "labels_total_v2.json"),
            "structures": STRUCTURES,
            "dims": 2,
            "slice_size": [32, 32],
            "hu_window": [-160.0, 240.0],
        },
        "split": {"fixed": split, "student_fraction": 0.5},
        "model": {"name": "thesis_unet", "params": {"channels": [4, 8], "bottleneck": 16}},
        "train": {"epochs": 2, "batch_size": 4, "optimizer": {"name": "adamw", "lr": 1e-2}},
    }
    if kind == "train":
        config["multitask"] = {"reconstruction": "masked", "weight": 0.2, "mask_patch": 4}
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            config.setdefault(section, {})[field] = value
        else:
            config[section] = value
    return config


def ablation_config(dataset, teacher_run, section, epochs=1) -> dict:
    """A tiny distillation grid (``mtkd ablate``): the thesis pairs from ``teacher_run`` to a
    tiny student, ``section`` its ``ablation:`` section."""
    config = tiny_config(
        dataset,
        "distill",
        name="tiny-ablation",
        model={"name": "thesis_unet", "params": {"channels": [4, 8], "bottleneck": 8}},
        train_on="student_train",
        distill={"teacher": str(teacher_run), "preset": "thesis"},
    )
    config["train"]["epochs"] = epochs
    config["ablation"] = section
    return config


@pytest.fixture(scope="session")
def teacher_run(slab_dataset, tmp_path_factory) -> Path:
    """A tiny multi-task teacher trained for two epochs (its run folder)."""
    from mtkd.config import RunConfig
    from mtkd.engine.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("runs") / "teacher"
    config = RunConfig.from_dict(tiny_config(slab_dataset, "train", name="teacher"))
    Trainer(config, run_dir, progress=False, log=lambda _: None).run()
    return run_dir


@pytest.fixture
def make_config(slab_dataset):
    """``make_config(kind, **overrides)`` -> a tiny run config dict on the slab dataset;
    an override ``section__field=value`` sets one field of a section."""
    return lambda kind="train", **overrides: tiny_config(slab_dataset, kind, **overrides)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A scratch folder for one test module (the hostile-input tests)."""
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def small_ct(data_dir, base) -> Path:
    """A small crop of the bundled real CT (NIfTI)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    path = base / "small_ct.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(image, [24, 20, 8], [40, 30, 70]), str(path))
    return path


@pytest.fixture(scope="module")
def written_bundle(teacher_run, base, small_ct) -> Path:
    """The tiny teacher written as a MONAI bundle of ours (its metadata records the SHA-256)."""
    from mtkd.data.image_io import read_image
    from mtkd.export.bundle import write_bundle
    from mtkd.modelfiles.model_io import load_model

    folder = base / "bundle"
    write_bundle(load_model(teacher_run), folder, read_image(small_ct))
    return folder
