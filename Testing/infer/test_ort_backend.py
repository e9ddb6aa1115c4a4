"""ONNX Runtime as a CPU backend (mtkd.export.ort_backend, mtkd.export.ort_cache): logits equal
to torch's within the ONNX export's bound for 2-D slice batches and 3-D volumes of several
shapes from one session, the per-user cache (reused, keyed by the weights, damaged entries
replaced), the choice and its refusals, and the predictor's label maps on a real CT crop."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import expect_error

from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.errors import MTKDError
from mtkd.export import ort_backend, ort_cache
from mtkd.export.onnx import ONNX_RELATIVE_BOUND
from mtkd.export.ort_backend import (
    OrtCpuNetwork,
    network_for_backend,
    onnxruntime_model,
    probe_shape,
)
from mtkd.export.ort_cache import cache_key, cached_onnx_export, ort_cache_root
from mtkd.export.verify import max_logit_difference
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import LoadedModel, build_from_spec, export_model, load_model
from mtkd.modelfiles.onnx import OnnxNetwork, load_onnx

LABELS = LabelTable({1: "liver", 2: "spleen"})


def unet_spec(dims: int) -> dict:
    """A tiny MONAI UNet with batch norm, as the project's students (bench/inference_speed)."""
    params = {
        "spatial_dims": dims,
        "in_channels": 1,
        "out_channels": 3,
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "num_res_units": 1,
        "norm": "BATCH",
    }
    return {"name": "unet", "params": params, "reconstruction": "none"}


def prep_for(dims: int) -> Preprocessing:
    return Preprocessing(
        dims=dims,
        hu_window=(-160.0, 240.0),
        spacing=None if dims == 2 else (4.0, 4.0, 4.0),
        crop_foreground=False,
        slice_size=(32, 32),
        patch_size=(32, 32, 32),
        in_channels=1,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, LoadedModel]:
    """Untrained tiny MONAI UNets (2-D and 3-D) saved as model folders and loaded back."""
    loaded = {}
    for dims in (2, 3):
        torch.manual_seed(dims)
        folder = tmp_path_factory.mktemp(f"unet{dims}d") / "model"
        spec = unet_spec(dims)
        export_model(
            build_from_spec(spec),
            folder,
            spec=spec,
            labels=LABELS,
            prep=prep_for(dims),
            activation="softmax",
            lineage={"kind": "test"},
            name=f"unet{dims}d",
        )
        loaded[dims] = load_model(folder)
    return loaded


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ort-cache")


@pytest.fixture(scope="module")
def ort_models(models, cache) -> dict[int, LoadedModel]:
    return {dims: onnxruntime_model(model, cache)[0] for dims, model in models.items()}


def fresh_copy(model: LoadedModel) -> LoadedModel:
    """The model with its own copy of the network (to change weights in one test only)."""
    return dataclasses.replace(model, network=copy.deepcopy(model.network))


def assert_equal_logits(reference, ort_network, x: torch.Tensor) -> None:
    with torch.inference_mode():
        difference, scale = max_logit_difference(reference, ort_network, x)
    assert difference <= ONNX_RELATIVE_BOUND * (1.0 + scale), (tuple(x.shape), difference)


SHAPES = {
    2: [(1, 1, 32, 32), (7, 1, 48, 40), (3, 1, 64, 16)],
    3: [(1, 1, 32, 32, 32), (2, 1, 48, 40, 24), (1, 1, 64, 56, 40)],
}


@pytest.mark.parametrize("dims", [2, 3])
def test_logits_equal_torch_for_every_shape_from_one_session(models, ort_models, dims):
    network = ort_models[dims].network
    assert isinstance(network, OrtCpuNetwork)
    session = network.session
    generator = torch.Generator().manual_seed(1)
    for shape in SHAPES[dims]:
        x = torch.rand(shape, generator=generator)
        assert_equal_logits(models[dims].network, network, x)
        assert network(x).shape == (shape[0], 3, *shape[2:])
    assert network.session is session
    assert network.threads == torch.get_num_threads()


def test_a_wrong_network_would_fail_the_equality_check(models, ort_models):
    """The check above can fail: another network's logits are far outside the bound."""
    other = build_from_spec(unet_spec(2)).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with pytest.raises(AssertionError):
        assert_equal_logits(other, ort_models[2].network, x)


def test_the_cache_is_reused_and_keyed_by_the_weights(models, tmp_path, monkeypatch):
    monkeypatch.setenv("MTKD_CACHE", str(tmp_path))
    assert ort_cache_root() == tmp_path / "onnxruntime"
    model = fresh_copy(models[2])
    first = cached_onnx_export(model, model.network)
    assert first.exported and first.path.parent.parent == tmp_path / "onnxruntime"
    written = first.path.stat().st_mtime_ns
    second = cached_onnx_export(model, model.network)
    assert not second.exported and second.path == first.path
    assert second.path.stat().st_mtime_ns == written
    _, text = network_for_backend(model, "onnxruntime", "cpu")
    assert "ONNX cached at" in text and str(first.path) in text

    with torch.no_grad():
        next(model.network.parameters()).view(-1)[0] += 0.5
    changed = cached_onnx_export(model, model.network)
    assert changed.exported and changed.key != first.key and changed.path != first.path
    assert first.path.is_file()  # the other weights keep their entry
    changed_model, _ = network_for_backend(model, "onnxruntime", "cpu")
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    assert_equal_logits(model.network, changed_model.network, x)


def test_a_damaged_entry_is_replaced_not_trusted(models, tmp_path):
    model = models[2]
    entry = cached_onnx_export(model, model.network, tmp_path)
    entry.path.write_bytes(b"not an onnx graph")
    again = cached_onnx_export(model, model.network, tmp_path)
    assert again.exported and again.path == entry.path
    replaced, _ = onnxruntime_model(model, tmp_path)
    assert_equal_logits(model.network, replaced.network, torch.rand(2, 1, 32, 32))


def test_an_entry_holding_another_key_is_not_read(models, tmp_path):
    """A whole, sealed entry found under a key it does not record is exported again."""
    model = fresh_copy(models[2])
    original = cached_onnx_export(model, model.network, tmp_path)
    with torch.no_grad():
        next(model.network.parameters()).view(-1)[0] -= 0.5
    other_key = cache_key(model, ort_cache.SegmentationOnly(model.network))
    shutil.copytree(original.path.parent, tmp_path / other_key)
    entry = cached_onnx_export(model, model.network, tmp_path)
    assert entry.exported and entry.key == other_key


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="folder owners are POSIX user ids")
def test_a_cache_folder_of_another_user_is_refused(models, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: tmp_path.stat().st_uid + 1)
    with expect_error(tmp_path, "another user"):
        cached_onnx_export(models[2], models[2].network, tmp_path)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_explicit_onnxruntime_on_torchscript_is_a_clear_error(models, tmp_path):
    model = models[2]
    traced = torch.jit.trace(copy.deepcopy(model.network), torch.rand(1, 1, 32, 32))
    scripted = dataclasses.replace(model, network=traced)
    with expect_error(model.folder, "onnxruntime", "TorchScript"):
        network_for_backend(scripted, "onnxruntime", "cpu", cache_root=tmp_path)
    same, text = network_for_backend(scripted, "auto", "cpu", cache_root=tmp_path)
    assert same is scripted and "TorchScript" in text and "as loaded" in text
    assert not any(tmp_path.iterdir())  # nothing exported


def test_an_onnx_model_file_keeps_running_as_loaded(ort_models):
    onnx_model = load_onnx(ort_models[2].network.path.parent)  # a cache entry is an export
    assert isinstance(onnx_model.network, OnnxNetwork)
    for backend in ("torch", "onnxruntime", "auto"):
        same, text = network_for_backend(onnx_model, backend, "cpu")
        assert same is onnx_model and "ONNX" in text


def test_missing_onnxruntime(models, cache, monkeypatch):
    monkeypatch.setattr(ort_backend, "missing_packages", lambda: ["onnxruntime"])
    with expect_error(models[3].folder, "needs onnxruntime", "mtkd[onnx]"):
        network_for_backend(models[3], "onnxruntime", "cpu", cache_root=cache)
    same, text = network_for_backend(models[3], "auto", "cpu", cache_root=cache)
    assert same is models[3] and text.startswith("torch (auto: ") and "onnxruntime" in text


def test_logits_that_differ_refuse_onnxruntime(models, cache, monkeypatch):
    def off(self, x):
        return OnnxNetwork.__call__(self, x) + 0.5

    monkeypatch.setattr(OrtCpuNetwork, "__call__", off)
    with expect_error(models[3].folder, "differ", "allowed"):
        network_for_backend(models[3], "onnxruntime", "cpu", cache_root=cache)
    same, text = network_for_backend(models[3], "auto", "cpu", cache_root=cache)
    assert same is models[3] and text.startswith("torch (auto: ") and "differ" in text


@pytest.mark.parametrize("dims", [2, 3])
def test_auto_picks_one_and_says_both_times(models, cache, dims):
    chosen, text = network_for_backend(models[dims], "auto", "cpu", cache_root=cache)
    timing = re.search(r"onnxruntime ([0-9.e+-]+) s, torch ([0-9.e+-]+) s per forward pass", text)
    assert timing, text
    ort_s, torch_s = (float(v) for v in timing.groups())
    if isinstance(chosen.network, OrtCpuNetwork):
        assert text.startswith("onnxruntime (auto: ") and ort_s <= torch_s
    else:
        assert chosen is models[dims] and text.startswith("torch (auto: ") and torch_s <= ort_s


def test_other_devices_and_backends(models, cache):
    model = models[2]
    same, text = network_for_backend(model, "auto", "cuda", cache_root=cache)
    assert same is model and text.startswith("torch (auto: ") and "cuda" in text
    with expect_error(model.folder, "runs on the CPU"):
        network_for_backend(model, "onnxruntime", "cuda", cache_root=cache)
    assert network_for_backend(model, "torch", "cpu") == (model, "torch")
    with pytest.raises(MTKDError, match="unknown backend"):
        network_for_backend(model, "tensorrt", "cpu")


def test_the_probe_is_what_the_cpu_predictor_plans(models):
    slices = probe_shape(models[2], models[2].network)
    plan = Predictor(models[2], "cpu").plan((32, 32, 224))
    assert slices == (plan.batch, 1, 32, 32)
    whole = probe_shape(models[3], models[3].network)  # 400 x 400 x 336 mm at 4 mm
    assert whole == (1, 1, 100, 100, 84)
    assert Predictor(models[3], "cpu").plan((100, 100, 84)).shape == whole


@pytest.fixture(scope="module")
def ct_crop(data_dir) -> sitk.Image:
    """A crop of the real abdomen CT (3 mm voxels) holding liver, spleen and kidneys."""
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    return sitk.RegionOfInterest(image, [96, 80, 40], [12, 10, 60])


@pytest.mark.parametrize("dims", [2, 3])
def test_the_predictor_gives_torchs_label_map(models, ort_models, ct_crop, dims):
    expected = Predictor(models[dims], "cpu").predict(ct_crop)
    actual = Predictor(ort_models[dims], "cpu").predict(ct_crop)
    assert actual.plan == expected.plan
    shape = (120, 100, 90)
    plans = [
        Predictor(m[dims], "cpu", memory_budget_bytes=1 << 30).plan(shape)
        for m in (
            models,
            ort_models,
        )
    ]
    assert plans[0] == plans[1]
    a = sitk.GetArrayFromImage(expected.labelmap)
    b = sitk.GetArrayFromImage(actual.labelmap)
    assert set(np.unique(a)) - {0}, "the untrained network should label something"
    differing = int((a != b).sum())
    print(f"{dims}-D: {differing} of {a.size} voxels differ, plan {actual.plan}")
    # near-ties of two classes may flip under a 1e-6 logit difference: a few voxels at most
    assert differing <= max(2, a.size // 10_000)
    for value in (1, 2):
        x, y = a == value, b == value
        if x.sum() + y.sum():
            assert 2 * (x & y).sum() / (x.sum() + y.sum()) >= 0.999


def test_segment_with_the_onnxruntime_backend_gives_torchs_labels(
    models, cache, data_dir, tmp_path, capsys, monkeypatch
):
    """`mtkd segment --backend onnxruntime` (and auto): the label map of `--backend torch`."""
    from mtkd.cli import main

    monkeypatch.setenv("MTKD_CACHE", str(cache.parent / "cli-cache"))
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(image, [96, 80, 40], [20, 10, 30]), str(ct))
    folder = str(models[2].folder)
    outputs = {}
    for backend in ("torch", "onnxruntime", "auto"):
        outputs[backend] = tmp_path / f"{backend}.nii.gz"
        argv = ["segment", folder, str(ct), "-o", str(outputs[backend]), "--backend", backend]
        assert main([*argv, "--no-postprocessing"]) == 0
        said = capsys.readouterr().err
        if backend != "torch":
            assert "backend: " in said and "max logit difference" in said, said
    torch_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs["torch"])))
    assert len(np.unique(torch_labels)) > 1
    for backend in ("onnxruntime", "auto"):
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs[backend])))
        assert (labels != torch_labels).mean() <= 1e-4
