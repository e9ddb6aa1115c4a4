"""Helpers shared by the tests: expected errors, DICOM series written from a real CT, a run
stopped at a chosen batch."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import SimpleITK as sitk

from mtkd.data.image_io import write_image
from mtkd.data.synth import LABELS, make_subject
from mtkd.errors import MTKDError


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str, skip: int = -1) -> None:
    """Write ``image`` (HU) as CT slices with the usual tags; slice ``skip`` is left out."""
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    hu = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k == skip:
            continue
        sl = hu[:, :, k : k + 1]  # one-slice 3-D image: keeps an oblique geometry
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(
                f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))
            ),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",
            "0018|0050": str(image.GetSpacing()[2]),
            "0028|1052": "-1024",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


@contextmanager
def expect_error(path: Path | str, *words: str) -> Iterator[pytest.ExceptionInfo]:
    """Expect MTKDError whose message names ``path`` and holds each of ``words``."""
    with pytest.raises(MTKDError) as info:
        yield info
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word.lower() in message.lower(), message


def read_with_slicer(path: Path | str):
    """A ``.seg.nrrd`` read by Slicer's own storage node (slicer-core, headless) -> its
    vtkSegmentation; the test fails if Slicer cannot read the file."""
    import slicer

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return node.GetSegmentation()


def stop_at_batch(trainer, batch: int) -> None:
    """Make ``trainer`` receive a stop request (as from SIGINT) during its ``batch``-th batch,
    counted from 1 over the whole run."""
    original, batches = trainer._batch_loss, []

    def counting(*args):
        batches.append(1)
        if len(batches) == batch:
            trainer.stop.request("test")
        return original(*args)

    trainer._batch_loss = counting


def slice_prep():
    """The preprocessing of the tiny 2-D test models: 32x32 slices at their own spacing, HU
    window (-160, 240), no foreground crop."""
    from mtkd.data.preprocess import Preprocessing

    return Preprocessing(
        dims=2,
        hu_window=(-160.0, 240.0),
        spacing=None,
        crop_foreground=False,
        slice_size=(32, 32),
        patch_size=(32, 32, 32),
        in_channels=1,
    )


def untrained_model(
    folder: Path, names: tuple[str, ...] = ("liver",), seed: int | None = None
) -> Path:
    """An untrained tiny 2-D thesis U-Net exported as our model folder (instant, real files):
    softmax over background + ``names``, 32x32 slices, HU window (-160, 240); ``seed``: its
    random weights from that seed (the global generator left as it was)."""
    import torch

    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return untrained_model(folder, names)
    from mtkd.data.labels import LabelTable
    from mtkd.modelfiles.model_io import build_from_spec, export_model

    spec = {
        "name": "thesis_unet",
        "params": {
            "in_channels": 1,
            "out_channels": len(names) + 1,
            "channels": [4],
            "bottleneck": 8,
        },
        "reconstruction": "none",
    }
    export_model(
        build_from_spec(spec),
        folder,
        spec=spec,
        labels=LabelTable({value: name for value, name in enumerate(names, start=1)}),
        prep=slice_prep(),
        activation="softmax",
        lineage={"kind": "test"},
    )
    return folder


# networks with an input shape each: (name, params, (B, C, *S)); test_models and
# test_distributed build every one
NETWORK_CASES = [
    ("thesis_unet", {"channels": (4, 8), "bottleneck": 16}, (2, 3, 16, 16)),
    ("thesis_unet", {"channels": (4, 8, 8), "spatial_dims": 3, "in_channels": 1}, (2, 1, 8, 8, 8)),
    ("thesis_s1", {}, (2, 3, 16, 16)),
    ("thesis_s1", {"spatial_dims": 3, "in_channels": 1, "out_channels": 3}, (2, 1, 8, 8, 8)),
    ("thesis_s2", {}, (2, 3, 16, 16)),
    ("thesis_t1_backbone", {}, (2, 3, 16, 16)),
    ("unet", {"spatial_dims": 2}, (2, 1, 32, 32)),
    ("unet", {"spatial_dims": 2, "channels": (4, 8, 16, 32), "num_res_units": 1}, (2, 1, 16, 16)),
    ("unet", {"channels": (4, 8, 16), "num_res_units": 0}, (2, 1, 8, 8, 8)),
    ("basic_unet", {"spatial_dims": 2, "features": (4, 4, 8, 16, 32, 4)}, (2, 1, 32, 32)),
    ("basic_unet", {"features": (4, 4, 8, 8, 16, 4)}, (2, 1, 32, 16, 16)),
    ("segresnet", {"spatial_dims": 2, "in_channels": 3}, (2, 3, 32, 32)),
    ("segresnet", {"blocks_down": (1, 1, 1)}, (2, 1, 16, 16, 16)),
    ("swinunetr", {"spatial_dims": 2, "feature_size": 12}, (1, 1, 64, 64)),
    ("swinunetr", {"feature_size": 12}, (1, 1, 64, 32, 32)),
    ("dynunet", {"spatial_dims": 2, "depth": 3, "filters": (4, 8, 16, 32)}, (2, 1, 32, 32)),
    ("dynunet", {"depth": 2, "filters": (4, 8, 16)}, (2, 1, 16, 16, 16)),
    (
        "dynunet",
        {"strides": (1, (2, 2, 1), 2), "kernel_size": (3, 3, 3), "filters": (4, 8, 16)},
        (2, 1, 16, 16, 8),
    ),
]


def network_case_id(case: tuple) -> str:
    """A test id for a :data:`NETWORK_CASES` entry: name, dims and input size."""
    name, params, shape = case
    return f"{name}-{len(shape) - 2}d-{'-'.join(map(str, shape[2:]))}"


# --- protocols -------------------------------------------------------------------------------
SPLEEN = "thesis-2d-spleen"
# a 2-D teacher small enough for a CPU test, with T1's layout (four levels, taps enc2/dec4)
TINY_T1 = [
    "teacher:model.name=thesis_unet",
    "teacher:model.params={channels: [8, 16, 32, 64], bottleneck: 64, convs_per_block: 2}",
]


def spleen_task09(folder: Path, subjects: int) -> Path:
    """An MSD Task09-format folder: synthetic phantoms with only the spleen labelled."""
    spleen = next(value for value, name in LABELS.items() if name == "spleen")
    entries = []
    for index in range(subjects):
        image, label = make_subject(11, index, (48, 48, 16), (6.0, 6.0, 6.0)).images()
        binary = sitk.Cast(sitk.Equal(label, spleen), sitk.sitkUInt8)
        name = f"spleen_{index + 2}"
        write_image(image, folder / "imagesTr" / f"{name}.nii.gz")
        write_image(binary, folder / "labelsTr" / f"{name}.nii.gz")
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    dataset = {
        "name": "Spleen (SYNTHETIC phantoms in the Task09 layout)",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": subjects,
        "numTest": 0,
        "training": entries,
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


NNUNET_STRUCTURES = ["liver", "spleen", "kidney_right"]
SLABS = [80, 88, 96]  # first axial slice of each 6-slice slab; all three hold the structures


def write_nnunet_v2(root: Path, *, not_annotated: dict | None = None, labels: dict | None = None):
    """An nnU-Net v2 raw dataset folder (``imagesTr/<case>_0000.nii.gz``, ``labelsTr``,
    dataset.json with channel_names, labels name -> value, numTraining, file_ending) of slabs of
    the real abdomen CT; the spleen is erased from the label maps of ``not_annotated`` cases."""
    from conftest import DATA

    from mtkd.data.labels import LabelTable, remap_label_array

    image = sitk.ReadImage(str(DATA / "abdomen_ct.nii.gz"))
    seg = sitk.ReadImage(str(DATA / "abdomen_seg_total_fast.nii.gz"))
    _, mapping = LabelTable.from_json(DATA / "labels_total_v2.json").select(NNUNET_STRUCTURES)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for number, first in enumerate(SLABS):
        case = f"abd_{number:03d}"
        size, start = [image.GetSize()[0], image.GetSize()[1], 6], [0, 0, first]
        array = remap_label_array(
            sitk.GetArrayFromImage(sitk.RegionOfInterest(seg, size, start)), mapping
        )
        if case in (not_annotated or {}):
            array[array == 2] = 0  # nobody drew the spleen here
        label = sitk.GetImageFromArray(array)
        label.CopyInformation(sitk.RegionOfInterest(seg, size, start))
        ct = sitk.RegionOfInterest(image, size, start)
        sitk.WriteImage(ct, str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{case}.nii.gz"))
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": labels or {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3},
        "numTraining": len(SLABS),
        "file_ending": ".nii.gz",
    }
    if not_annotated is not None:
        dataset["mtkd"] = {"not_annotated": not_annotated}
    (root / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
    return root


def load_bench_script(relative: str, name: str):
    """The module of the script ``bench/<relative>`` (bench scripts are not a package),
    registered as ``name`` so that its dataclasses and child processes can find it."""
    path = Path(__file__).resolve().parents[1] / "bench" / relative
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
