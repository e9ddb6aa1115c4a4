"""TorchScript and ONNX exports of a 2-D multi-task teacher and a 3-D MONAI U-Net: folder
layout and metadata, numerical checks recomputed from the files, other input sizes, SHA and
corruption refusals, lone files with and without metadata, sabotaged exports."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
import torch
from conftest import DATA
from helpers import expect_error

from mtkd.data.image_io import read_image
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError
from mtkd.export.formats import export_model_as
from mtkd.export.onnx import ONNX_RELATIVE_BOUND, export_onnx
from mtkd.export.torchscript import TORCHSCRIPT_RELATIVE_BOUND, export_torchscript
from mtkd.export.verify import check_export, max_logit_difference, sample_input
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import METADATA, build_from_spec, export_model, load_model, sha256_of
from mtkd.modelfiles.onnx import OnnxNetwork, load_onnx
from mtkd.modelfiles.sources import load_any_model
from mtkd.modelfiles.torchscript import load_torchscript

CT = DATA / "abdomen_ct.nii.gz"
FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
BOUNDS = {"torchscript": TORCHSCRIPT_RELATIVE_BOUND, "onnx": ONNX_RELATIVE_BOUND}
UNET3D = {
    "name": "unet",
    "params": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": [4, 8, 16],
        "num_res_units": 1,
    },
    "reconstruction": "none",
}
CASES = [("2d", "torchscript"), ("2d", "onnx"), ("3d", "torchscript"), ("3d", "onnx")]


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    return read_image(CT)


@pytest.fixture(scope="module")
def sources(teacher_run, tmp_path_factory) -> dict[str, Path]:
    """Model folders: the tiny trained 2-D teacher and an untrained tiny 3-D MONAI U-Net."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet3d") / "model"
    export_model(
        build_from_spec(UNET3D),
        folder,
        spec=UNET3D,
        labels=LabelTable({1: "liver", 2: "spleen"}),
        prep=Preprocessing(
            dims=3,
            hu_window=(-160.0, 240.0),
            spacing=(4.0, 4.0, 4.0),
            crop_foreground=True,
            slice_size=(32, 32),
            patch_size=(32, 32, 32),
            in_channels=1,
        ),
        activation="softmax",
        lineage={"kind": "train", "teacher": {"network": "thesis_unet", "weights_sha256": "x"}},
        metrics={"best_val_dice": 0.5},
        name="unet3d",
    )
    return {"2d": teacher_run / "model", "3d": folder}


@pytest.fixture(scope="module")
def exports(sources, ct, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """All four exports, through each entry point: the 2-D TorchScript one with the CT
    sample taken from the teacher's run (its first test case)."""
    root = tmp_path_factory.mktemp("exports")
    done = {}
    done["2d", "torchscript"] = Path(
        export_model_as(sources["2d"].parent, "torchscript", root / "2d-ts")["path"]
    )
    export_onnx(load_model(sources["2d"]), root / "2d-onnx", ct, sample_name=str(CT))
    done["2d", "onnx"] = root / "2d-onnx"
    for fmt in ("torchscript", "onnx"):
        record = export_model_as(sources["3d"], fmt, root / f"3d-{fmt}", sample=CT)
        assert record["format"] == fmt and record["seconds"] > 0
        assert 0 <= record["max_abs_diff"] <= record["bound"]
        done["3d", fmt] = Path(record["path"])
    return done


def other_size_input(model, image: sitk.Image) -> torch.Tensor:
    """A CT input of another size than the export's trace: (3, C, 48, 40) slices in 2-D,
    (1, C, 24, 28, 20) in 3-D."""
    prep = model.prep
    if prep.dims == 2:
        changed = dataclasses.replace(prep, slice_size=(48, 40))
        return sample_input(dataclasses.replace(model, prep=changed), image, slices=3)
    changed = dataclasses.replace(prep, patch_size=(24, 28, 20))
    return sample_input(dataclasses.replace(model, prep=changed), image)


@pytest.mark.parametrize(("net", "fmt"), CASES)
def test_export_folder_and_metadata(exports, sources, ct, net, fmt):
    folder = exports[net, fmt]
    assert sorted(p.name for p in folder.iterdir()) == sorted([FILES[fmt], METADATA])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    source = load_model(sources[net])
    metadata = json.loads((folder / METADATA).read_text())
    assert metadata["format"] == fmt and metadata["weights_file"] == FILES[fmt]
    assert metadata["weights_sha256"] == sha256_of(folder / FILES[fmt])
    assert metadata["source_weights_sha256"] == source.metadata["weights_sha256"]
    for key in ("labels", "preprocessing", "network", "lineage", "metrics", "activation"):
        assert metadata[key] == source.metadata[key], key
    assert metadata["preprocessing"]["hu_window"] == list(source.prep.hu_window)
    check = metadata["export_check"]
    assert 0 <= check["max_abs_diff"] <= check["bound"]
    assert 0 <= check["other_size"]["max_abs_diff"] <= check["other_size"]["bound"]
    assert check["other_size"]["sample_shape"][2:] != check["sample_shape"][2:]
    if fmt == "onnx":
        assert metadata["exporter"]["name"] == "torch.onnx (dynamo)"
        assert metadata["exporter"]["opset"] >= 17
        assert check["providers"][-1] == "CPUExecutionProvider"
    # Recompute the recorded difference from the file, on the recorded CT sample.
    image = ct if check["sample"] == str(CT) else read_image(check["sample"])
    if net == "2d" and fmt == "torchscript":
        assert check["sample"] != str(CT)  # the run's own test case
    sample = sample_input(source, image)
    assert list(sample.shape) == check["sample_shape"]
    exported = load_any_model(folder)
    difference, _ = max_logit_difference(source.network, exported.network, sample)
    assert difference == pytest.approx(check["max_abs_diff"], rel=1e-3, abs=1e-7)


@pytest.mark.parametrize(("net", "fmt"), CASES)
def test_loaded_export_matches_on_another_size(exports, sources, ct, net, fmt):
    source = load_model(sources[net])
    exported = load_any_model(exports[net, fmt])
    assert exported.labels == source.labels and exported.prep == source.prep
    assert exported.activation == source.activation
    assert exported.size_multiple == source.size_multiple and not exported.has_taps
    assert isinstance(exported.network, OnnxNetwork if fmt == "onnx" else torch.jit.ScriptModule)
    sample = other_size_input(source, ct)
    with torch.no_grad():
        expected = source.network(sample)
        actual = exported.network(sample)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    bound = BOUNDS[fmt] * (1 + float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= bound


def test_teacher_export_holds_the_segmentation_only(exports, sources):
    teacher = load_model(sources["2d"])
    recon = {n for n, _ in teacher.network.named_parameters() if n.startswith("recon_decoder")}
    assert recon  # the source has a reconstruction decoder ...
    traced = load_any_model(exports["2d", "torchscript"]).network
    names = {n for n, _ in traced.named_parameters()}
    assert names and not any("recon" in n for n in names)  # ... the exports do not
    backbone = sum(p.numel() for p in teacher.network.backbone.parameters())
    assert sum(p.numel() for p in traced.parameters()) == backbone
    graph = onnx.load(str(exports["2d", "onnx"] / "model.onnx")).graph
    assert len(graph.output) == 1 and len(graph.input) == 1
    assert not any("recon" in i.name for i in graph.initializer)


@pytest.mark.parametrize("net", ["2d", "3d"])
def test_predictor_runs_the_exports(exports, sources, ct, net):
    expected = sitk.GetArrayFromImage(Predictor(load_model(sources[net])).predict(ct).labelmap)
    for fmt in ("torchscript", "onnx"):
        labelmap = Predictor(load_any_model(exports[net, fmt])).predict(ct).labelmap
        assert labelmap.GetSize() == ct.GetSize()
        # Float differences may flip a near-tie voxel; the label maps must otherwise agree.
        assert np.mean(sitk.GetArrayFromImage(labelmap) != expected) < 1e-3, fmt


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_changed_or_truncated_file_is_refused(exports, tmp_path, fmt):
    folder = shutil.copytree(exports["3d", fmt], tmp_path / "copy")
    weights = folder / FILES[fmt]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with expect_error(weights, "SHA-256"):
        load_any_model(folder)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with expect_error(weights, "SHA-256"):
        load_any_model(folder)
    # A lone truncated file has no checksum: the loader reports it as unreadable.
    lone = tmp_path / f"lone{Path(FILES[fmt]).suffix}"
    lone.write_bytes(exports["3d", fmt].joinpath(FILES[fmt]).read_bytes()[:5000])
    loader = load_torchscript if fmt == "torchscript" else load_onnx
    with expect_error(lone, "corrupt or truncated"):
        loader(lone)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_lone_file_carries_or_needs_its_metadata(exports, sources, tmp_path, fmt):
    source = load_model(sources["3d"])
    lone = tmp_path / "carried" / FILES[fmt]
    lone.parent.mkdir()
    shutil.copy(exports["3d", fmt] / FILES[fmt], lone)
    model = load_any_model(lone)  # metadata embedded in the file
    assert model.labels == source.labels and model.prep == source.prep
    assert model.metadata["weights_sha256"] == sha256_of(lone)

    bare = tmp_path / "bare" / FILES[fmt]
    bare.parent.mkdir()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(load_torchscript(lone).network, str(bare))  # no extra files
    else:
        proto = onnx.load(str(lone))
        del proto.metadata_props[:]
        onnx.save(proto, str(bare))
    with expect_error(bare, "labels", "preprocessing", "activation", f"{bare.name}.json"):
        load_any_model(bare)
    sidecar = {k: source.metadata[k] for k in ("labels", "preprocessing", "activation")}
    sidecar["labels"] = {"1": "liver", "2": "gallbladder"}
    bare.with_name(bare.name + ".json").write_text(json.dumps(sidecar))
    model = load_any_model(bare)
    assert model.labels == LabelTable({1: "liver", 2: "gallbladder"})
    assert model.prep == source.prep
    assert model.size_multiple == 16  # neither a size_multiple nor a network spec: the default
    del sidecar["activation"]
    bare.with_name(bare.name + ".json").write_text(json.dumps(sidecar))
    with expect_error(bare, "activation"):
        load_any_model(bare)


class TraceSizeSwitch(torch.nn.Module):
    """A network whose output depends on its input width through Python control flow, which a
    trace freezes: right at the trace's size, wrong at any other."""

    def __init__(self, network: torch.nn.Module, width: int):
        super().__init__()
        self.network, self.width = network, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        return logits if x.shape[-1] <= self.width else -logits


def test_export_differing_from_the_network_is_refused(exports, sources, ct, tmp_path):
    source = load_model(sources["3d"])
    sample = sample_input(source, ct)
    # The export compared with another network: check_export refuses it.
    other = build_from_spec(UNET3D).eval()
    exported = load_any_model(exports["3d", "onnx"]).network
    with expect_error(tmp_path, "differs"):
        check_export(other, exported, sample, tmp_path)
    # A network that no trace reproduces at other sizes: both exports are refused, nothing
    # is published.
    width = sample.shape[-1]
    sabotaged = dataclasses.replace(source, network=TraceSizeSwitch(source.network, width).eval())
    with expect_error(tmp_path / "ts", "differs", "traced input size"):
        export_torchscript(sabotaged, tmp_path / "ts", ct)
    with expect_error(tmp_path / "onnx", "dynamo", "torchscript", "differs"):
        export_onnx(sabotaged, tmp_path / "onnx", ct)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class DataDependent(torch.nn.Module):
    """A network branching on a voxel value: torch.export cannot export it, a trace can (the
    windowed CT lies in [0, 1], so the branch taken is the same for every CT input)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sign = 1.0 if float(x.max()) <= 1.0 else -1.0
        return sign * self.network(x)


def test_onnx_falls_back_to_the_torchscript_based_exporter(sources, ct, tmp_path):
    source = load_model(sources["3d"])
    model = dataclasses.replace(source, network=DataDependent(source.network).eval())
    metadata = export_onnx(model, tmp_path / "onnx", ct)
    exporter = metadata["exporter"]
    assert exporter["name"] == "torch.onnx (torchscript)" and exporter["opset"] == 17
    assert len(exporter["failed"]) == 1 and exporter["failed"][0].startswith("dynamo: ")
    check = metadata["export_check"]
    assert 0 <= check["other_size"]["max_abs_diff"] <= check["other_size"]["bound"]
    exported = load_any_model(tmp_path / "onnx")
    assert exported.metadata["exporter"] == exporter
    difference, scale = max_logit_difference(
        source.network, exported.network, other_size_input(source, ct)
    )
    assert difference <= ONNX_RELATIVE_BOUND * (1 + scale)


def test_export_destination_rules(exports, sources, ct, tmp_path):
    source = load_model(sources["3d"])
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with expect_error(stranger, "not empty"):
        export_torchscript(source, stranger, ct)
    with expect_error(sources["3d"], "not empty"):  # never over the source model
        export_torchscript(source, sources["3d"], ct)
    onnx_copy = shutil.copytree(exports["3d", "onnx"], tmp_path / "onnx")
    with expect_error(onnx_copy, "onnx export"):
        export_torchscript(source, onnx_copy, ct)
    # Exporting again over an export of the same format replaces it.
    ts_copy = shutil.copytree(exports["3d", "torchscript"], tmp_path / "ts")
    (ts_copy / "model.ts").write_bytes(b"stale")
    export_torchscript(source, ts_copy, ct)
    assert load_any_model(ts_copy).labels == source.labels
    assert (stranger / "notes.txt").read_text() == "mine"


def test_export_model_as_needs_a_sample_or_a_run(sources, tmp_path):
    with expect_error(sources["3d"], "--sample"):
        export_model_as(sources["3d"], "onnx", tmp_path / "out")
    with pytest.raises(MTKDError, match="unknown export format"):
        export_model_as(sources["3d"], "tflite", tmp_path / "out", sample=CT)
    assert not (tmp_path / "out").exists()


def test_export_model_as_bundle(sources, tmp_path):
    record = export_model_as(sources["3d"], "bundle", tmp_path / "bundle", sample=CT)
    assert record["format"] == "bundle" and record["sample"] == str(CT)
    assert 0 <= record["max_abs_diff"] <= record["bound"]
    source, bundle = load_model(sources["3d"]), load_any_model(tmp_path / "bundle")
    assert bundle.labels == source.labels and bundle.prep == source.prep


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_metadata_is_sealed_and_checked(exports, tmp_path, fmt):
    """An export's metadata (in the folder and embedded in the file) records its checksum: an
    edit is refused; without the checksum, a reversed HU window is refused by the schema, for
    the folder and for a lone file's sidecar."""
    folder = Path(shutil.copytree(exports["3d", fmt], tmp_path / "copy"))
    metadata_file = folder / METADATA
    original = json.loads(metadata_file.read_text())
    assert original["metadata_sha256"]
    edited = copy.deepcopy(original)
    edited["preprocessing"]["hu_window"] = [0, 80]
    metadata_file.write_text(json.dumps(edited))
    with expect_error(metadata_file, "metadata_sha256", "changed"):
        load_any_model(folder)
    del edited["metadata_sha256"]
    edited["preprocessing"]["hu_window"] = [240, -160]
    metadata_file.write_text(json.dumps(edited))
    with expect_error(metadata_file, "preprocessing.hu_window", "low < high"):
        load_any_model(folder)

    lone = tmp_path / "lone" / FILES[fmt]
    lone.parent.mkdir()
    shutil.copy(folder / FILES[fmt], lone)
    assert load_any_model(lone).prep.hu_window == tuple(original["preprocessing"]["hu_window"])
    if fmt == "torchscript":  # the sidecar is read when the file embeds nothing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(load_torchscript(lone).network, str(lone))
    else:
        proto = onnx.load(str(lone))
        del proto.metadata_props[:]
        onnx.save(proto, str(lone))
    sidecar = {k: edited[k] for k in ("labels", "preprocessing", "activation")}
    lone.with_name(lone.name + ".json").write_text(json.dumps(sidecar))
    with expect_error(lone, "preprocessing.hu_window"):
        load_any_model(lone)
