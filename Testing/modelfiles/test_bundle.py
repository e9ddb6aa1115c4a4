"""MONAI bundles: writing ours, verifying them with MONAI's checks, reading ours and third-party
ones without running their configs, and refusing unsafe zips, configs and weights."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
import yaml
from conftest import DATA, ROOT
from helpers import expect_error
from monai.bundle import ConfigParser
from monai.bundle import run as monai_run
from monai.networks.nets import UNet

from mtkd.data.image_io import read_image
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.export.bundle import verify_bundle, write_bundle
from mtkd.export.bundle_metadata import SCHEMA_URL
from mtkd.export.verify import sample_input
from mtkd.modelfiles.bundle import load_bundle
from mtkd.modelfiles.bundle_config import THESIS_TARGET
from mtkd.modelfiles.model_io import build_from_spec, export_model, load_model, sha256_of
from mtkd.modelfiles.sources import load_any_model
from mtkd.modelfiles.zips import MAX_ZIP_MEMBER, check_zip_sizes, safe_extract
from mtkd.models import MultiTaskNet, build_network

UNET_PARAMS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8, 16],
    "num_res_units": 1,
}


@pytest.fixture(scope="module")
def ct():
    return read_image(DATA / "abdomen_ct.nii.gz")


@pytest.fixture(scope="module")
def models(teacher_run, tmp_path_factory) -> dict:
    """The tiny 2-D multi-task thesis teacher and a tiny 3-D MONAI UNet model of ours."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet3d") / "model"
    prep = Preprocessing(
        dims=3,
        hu_window=(-160.0, 240.0),
        spacing=(6.0, 6.0, 6.0),
        crop_foreground=True,
        slice_size=(128, 128),
        patch_size=(32, 32, 32),
        in_channels=1,
    )
    export_model(
        build_network("unet", **UNET_PARAMS),
        folder,
        spec={"name": "unet", "params": UNET_PARAMS, "reconstruction": "none"},
        labels=LabelTable({1: "liver", 2: "spleen"}),
        prep=prep,
        activation="softmax",
        lineage={"kind": "train"},
        name="unet3d",
    )
    return {"teacher2d": load_model(teacher_run), "unet3d": load_model(folder)}


@pytest.fixture(scope="module")
def bundles(models, ct, tmp_path_factory) -> dict:
    """Each model written as a bundle: name -> (model, bundle folder, returned metadata)."""
    root = tmp_path_factory.mktemp("bundles")
    return {
        name: (model, root / name, write_bundle(model, root / name, ct))
        for name, model in models.items()
    }


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MTKD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def _zip(folder: Path, target: Path, top: str | None) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                archive.write(path, f"{top}/{name}" if top else name)
    return target


@torch.no_grad()
def _same_logits(model, loaded, ct) -> None:
    sample = sample_input(model, ct)
    model.network.eval()
    assert torch.equal(model.network(sample), loaded.network(sample))


# --- writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["teacher2d", "unet3d"])
def test_written_bundle_holds_monai_metadata_config_and_weights(bundles, name):
    model, folder, returned = bundles[name]
    for relative in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert (folder / relative).is_file(), relative
    assert "SHA-256" in (folder / "docs" / "README.md").read_text(encoding="utf-8")
    assert "licen" in (folder / "LICENSE").read_text().lower()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    assert metadata == returned
    assert metadata["schema"] == SCHEMA_URL
    pred = metadata["network_data_format"]["outputs"]["pred"]
    image = metadata["network_data_format"]["inputs"]["image"]
    assert image["format"] == "hounsfield" and image["modality"] == "CT"
    assert len(image["spatial_shape"]) == model.prep.dims
    section = metadata["mtkd"]
    assert section["weights_sha256"] == sha256_of(folder / "models" / "model.pt")
    assert section["labels"] == model.labels.to_dict()
    assert section["preprocessing"] == model.prep.to_dict()
    check = section["export_check"]
    assert 0.0 <= check["max_abs_diff"] <= check["bound"]
    config = json.loads((folder / "configs" / "inference.json").read_text())
    state = torch.load(folder / "models" / "model.pt", weights_only=True)
    if name == "teacher2d":
        # the multi-task teacher: only its segmentation network is exported
        assert isinstance(model.network, MultiTaskNet)
        assert config["network_def"]["_target_"] == THESIS_TARGET
        assert set(state) == set(model.network.backbone.state_dict())
        assert pred["channel_def"] == {"0": "background", **model.labels.to_dict()}
        assert metadata["required_packages_version"]["mtkd"]
        assert config["inferer"]["_target_"] == "SliceInferer"
    else:
        assert config["network_def"]["_target_"] == "monai.networks.nets.UNet"
        assert config["network_def"]["strides"] == [2, 2]
        assert pred["channel_def"] == {"0": "background", "1": "liver", "2": "spleen"}
        assert pred["num_channels"] == 3
        assert config["inferer"]["roi_size"] == [32, 32, 32]


@pytest.mark.parametrize("name", ["teacher2d", "unet3d"])
def test_monai_runs_the_written_inference_config(bundles, ct, tmp_path, name):
    model, folder, _ = bundles[name]
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(DATA / "abdomen_ct.nii.gz", data)
    with torch.enable_grad():  # the bundle switches gradients off, as a bundle process does
        monai_run(
            config_file=str(folder / "configs" / "inference.json"),
            bundle_root=str(folder),
            dataset_dir=str(data),
            output_dir=str(tmp_path / "eval"),
            logging_file=False,
        )
    assert torch.is_grad_enabled()
    written = read_image(tmp_path / "eval" / "abdomen_ct_seg.nii.gz")
    assert written.GetSize() == ct.GetSize()
    assert written.GetSpacing() == pytest.approx(ct.GetSpacing())
    assert written.GetOrigin() == pytest.approx(ct.GetOrigin(), abs=1e-4)
    values = set(sitk.GetArrayViewFromImage(written).ravel().tolist())
    assert values <= set(range(len(model.labels) + 1))


def test_write_refuses_a_folder_that_is_not_an_mtkd_bundle(models, ct, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with expect_error(tmp_path, "not empty"):
        write_bundle(models["unet3d"], tmp_path, ct)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --- verifying -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["teacher2d", "unet3d"])
def test_verify_bundle_passes_monai_checks(bundles, name):
    verify_bundle(bundles[name][1])


def test_verify_bundle_fails_on_bad_metadata(bundles, tmp_path):
    folder = _copy(bundles["unet3d"][1], tmp_path)
    metadata_file = folder / "configs" / "metadata.json"
    good = json.loads(metadata_file.read_text())
    broken = copy.deepcopy(good)
    del broken["network_data_format"]["outputs"]["pred"]["channel_def"]
    metadata_file.write_text(json.dumps(broken))
    with expect_error(folder, "metadata", "channel_def"):
        verify_bundle(folder)
    wrong = copy.deepcopy(good)
    wrong["network_data_format"]["outputs"]["pred"]["num_channels"] = 5
    metadata_file.write_text(json.dumps(wrong))
    with expect_error(folder, "input/output"):
        verify_bundle(folder)


def test_verify_bundle_uses_the_schema_it_is_given(bundles, tmp_path):
    folder = bundles["unet3d"][1]
    ours = ROOT / "mtkd" / "resources" / "monai_bundle_schema.json"
    stricter = json.loads(ours.read_text())
    stricter["required"].append("references")
    schema = tmp_path / "official.json"
    schema.write_text(json.dumps(stricter))
    with expect_error(folder, "references"):
        verify_bundle(folder, schema=schema)
    with expect_error(tmp_path / "absent.json", "schema file not found"):
        verify_bundle(folder, schema=tmp_path / "absent.json")


# --- reading ours back -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["teacher2d", "unet3d"])
def test_round_trip_from_folder_and_zip(bundles, ct, tmp_path, cache, name):
    model, folder, _ = bundles[name]
    sources = [
        (folder, {}),
        (_zip(folder, tmp_path / "top.zip", top=name), {"extract_to": tmp_path / "out"}),
        (_zip(folder, tmp_path / "root.zip", top=None), {}),
    ]
    for source, options in sources:
        loaded = load_bundle(source, **options)
        assert loaded.labels == model.labels
        assert loaded.prep == model.prep
        assert loaded.activation == model.activation
        assert loaded.size_multiple == model.size_multiple
        assert loaded.has_taps
        assert loaded.metadata["weights_sha256"] == sha256_of(folder / "models" / "model.pt")
        _same_logits(model, loaded, ct)
        # the spec rebuilds the same network for taps and distillation presets
        rebuilt = build_from_spec(loaded.metadata["network"])
        assert set(rebuilt.state_dict()) == set(loaded.network.state_dict())
    assert any(cache.rglob("metadata.json"))  # the root zip went to the cache
    again = load_any_model(tmp_path / "root.zip")
    _same_logits(model, again, ct)
    _same_logits(model, load_any_model(folder), ct)


def test_missing_files_are_named(bundles, tmp_path):
    folder = _copy(bundles["unet3d"][1], tmp_path)
    (folder / "models" / "model.pt").unlink()
    with expect_error(folder / "models" / "model.pt", "missing"):
        load_bundle(folder)
    (folder / "configs" / "inference.json").unlink()
    with expect_error(folder / "configs" / "inference.json", "missing"):
        load_bundle(folder)
    (folder / "configs" / "metadata.json").unlink()
    with expect_error(folder / "configs" / "metadata.json", "missing"):
        load_bundle(folder)


def test_tampered_weights_are_refused(bundles, tmp_path):
    folder = _copy(bundles["unet3d"][1], tmp_path)
    weights = folder / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1.0
    torch.save(state, weights)
    with expect_error(weights, "SHA-256"):
        load_bundle(folder)


# --- third-party bundles ---------------------------------------------------------------------


def _third_party(folder: Path, marker: Path, as_yaml: bool = False) -> UNet:
    """A bundle as another tool writes it: @references, $ expressions outside network_def
    (each would create ``marker`` if evaluated), a checkpoint under "model"."""
    torch.manual_seed(1)
    network = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    (folder / "models").mkdir(parents=True)
    (folder / "configs").mkdir()
    torch.save({"model": network.state_dict()}, folder / "models" / "model.pt")
    touch = f"$open({str(marker)!r}, 'w')"
    config = {
        "imports": ["$import os"],
        "bundle_root": ".",
        "device": f"$torch.device('cpu') if {touch[1:]} else None",
        "channels": [4, 8, 16],
        "classes": 3,
        "pixdim": [2.5, 2.5, 3.0],
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": "@classes",
            "channels": "@channels",
            "strides": [2, 2],
            "num_res_units": 1,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -57,
                    "a_max": 164,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"},
                {"_target_": "EnsureTyped", "keys": "image", "dtype": touch},
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [48, 48, 32]},
        "run": [touch],
    }
    if as_yaml:
        (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    else:
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
    tensor = {
        "type": "image",
        "num_channels": 1,
        "spatial_shape": [64, 64, 64],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": True,
    }
    metadata = {
        "schema": SCHEMA_URL,
        "version": "0.4.1",
        "monai_version": "1.3.0",
        "pytorch_version": "2.1.0",
        "numpy_version": "1.26.0",
        "required_packages_version": {"nibabel": "5.2.0"},
        "task": "liver and spleen",
        "description": "a hand-made test bundle",
        "authors": "test",
        "copyright": "none",
        "network_data_format": {
            "inputs": {"image": {**tensor, "format": "hounsfield", "channel_def": {"0": "image"}}},
            "outputs": {
                "pred": {
                    **tensor,
                    "format": "segmentation",
                    "num_channels": 3,
                    "channel_def": {"0": "background", "1": "liver", "2": "spleen"},
                }
            },
        },
    }
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    return network.eval()


@pytest.mark.parametrize("as_yaml", [False, True])
def test_third_party_bundle_loads_without_running_its_config(tmp_path, as_yaml):
    marker = tmp_path / "ran.txt"
    network = _third_party(tmp_path / "bundle", marker, as_yaml)
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded.labels == LabelTable({1: "liver", 2: "spleen"})
    assert loaded.activation == "softmax"
    assert loaded.prep == Preprocessing(
        dims=3,
        hu_window=(-57.0, 164.0),
        spacing=(2.5, 2.5, 3.0),
        crop_foreground=True,
        slice_size=(128, 128),
        patch_size=(48, 48, 32),
        in_channels=1,
    )
    assert loaded.metadata["network"]["name"] == "unet"  # mapped onto the registry
    assert loaded.size_multiple == 4
    sample = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(network(sample), loaded.network(sample))
    if not as_yaml:
        verify_bundle(tmp_path / "bundle")
    assert not marker.exists()


def _network_def_cases(marker: Path) -> dict:
    touch = f"open({str(marker)!r}, 'w')"
    return {
        "expression argument": {"num_res_units": f"$1 if {touch} else 1"},
        "other target": {"_target_": "builtins.open", "file": str(marker), "mode": "w"},
        "nested target": {"act": {"_target_": "builtins.open", "file": str(marker), "mode": "w"}},
        "requires": {"_requires_": f"${touch}"},
    }


@pytest.mark.parametrize(
    "case", ["expression argument", "other target", "nested target", "requires"]
)
def test_code_in_network_def_is_refused_and_not_run(tmp_path, case):
    marker = tmp_path / "ran.txt"
    folder = tmp_path / "bundle"
    _third_party(folder, tmp_path / "unused.txt")
    config_file = folder / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    change = _network_def_cases(marker)[case]
    if "_target_" in change:
        config["network_def"] = change
    else:
        config["network_def"].update(change)
    config_file.write_text(json.dumps(config))
    with expect_error(config_file, "run code"):
        load_bundle(folder)
    with expect_error(config_file, "run code"):
        verify_bundle(folder)
    assert not marker.exists()
    # MONAI itself would have run it
    parser = ConfigParser()
    parser.read_config(str(config_file))
    with contextlib.suppress(Exception):
        parser.get_parsed_content("network_def")
    assert marker.exists()


def test_network_given_as_an_expression_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    folder = tmp_path / "bundle"
    _third_party(folder, tmp_path / "unused.txt")
    config_file = folder / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    del config["network_def"]
    config["network"] = (
        f"$monai.networks.nets.UNet(3, 1, 3, (4, 8), (2,)) if open({str(marker)!r}, 'w') else 0"
    )
    config_file.write_text(json.dumps(config))
    with expect_error(config_file, "run code"):
        load_bundle(folder)
    assert not marker.exists()


def test_preprocessing_mtkd_cannot_reproduce_is_refused(tmp_path):
    folder = tmp_path / "bundle"
    _third_party(folder, tmp_path / "unused.txt")
    config_file = folder / "configs" / "inference.json"
    good = json.loads(config_file.read_text())
    steps = good["preprocessing"]["transforms"]

    def write(transforms):
        config = copy.deepcopy(good)
        config["preprocessing"]["transforms"] = transforms
        config_file.write_text(json.dumps(config))

    write([s for s in steps if s["_target_"] != "ScaleIntensityRanged"])
    with expect_error(config_file, "hu_window"):
        load_bundle(folder)
    write([{**s, "b_min": -1.0} if s["_target_"] == "ScaleIntensityRanged" else s for s in steps])
    with expect_error(config_file, "[-1.0, 1.0]"):
        load_bundle(folder)
    write([*steps, {"_target_": "NormalizeIntensityd", "keys": "image"}])
    with expect_error(config_file, "NormalizeIntensityd"):
        load_bundle(folder)
    write(steps)
    config = json.loads(config_file.read_text())
    config["postprocessing"] = {
        "_target_": "Compose",
        "transforms": [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}],
    }
    config_file.write_text(json.dumps(config))
    with expect_error(config_file, "multi-label"):
        load_bundle(folder)


class _MakesFolder:
    """Unpickling this calls os.makedirs(path): a stand-in for code hidden in a weights file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_code_in_weights_is_refused_and_not_run(tmp_path):
    folder = tmp_path / "bundle"
    _third_party(folder, tmp_path / "unused.txt")
    marker = tmp_path / "pickle-ran"
    weights = folder / "models" / "model.pt"
    torch.save({"model": _MakesFolder(str(marker))}, weights)
    with expect_error(weights, "refused to load weights"):
        load_bundle(folder)
    assert not marker.exists()
    torch.load(weights, weights_only=False)  # the payload is live
    assert marker.exists()


# --- zips ------------------------------------------------------------------------------------


def _bad_zip(path: Path, bundle: Path, name: str, link: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(bundle.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(bundle).as_posix())
        info = zipfile.ZipInfo(name)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd" if link else "evil")
    return path


@pytest.mark.parametrize(
    "member", ["../evil.txt", "configs/../../evil.txt", "ABSOLUTE", "C:/evil.txt", "LINK"]
)
def test_unsafe_zip_members_are_refused_before_writing(tmp_path, member, monkeypatch):
    bundle = tmp_path / "bundle"
    _third_party(bundle, tmp_path / "unused.txt")
    area = tmp_path / "area"
    target = area / "target"
    area.mkdir()
    name = {"ABSOLUTE": str(area / "evil.txt"), "LINK": "models/link.pt"}.get(member, member)
    archive = _bad_zip(tmp_path / "bad.zip", bundle, name, link=member == "LINK")
    with expect_error(archive, "refused to extract"):
        safe_extract(archive, target)
    with expect_error(archive, "refused to extract"):
        load_bundle(archive, extract_to=target)
    monkeypatch.setenv("MTKD_CACHE", str(area / "cache"))
    with expect_error(archive, "refused to extract"):
        load_bundle(archive)
    assert list(area.rglob("*")) == []  # nothing outside the target, nothing inside it
    assert not (tmp_path / "evil.txt").exists()


def test_zip_without_a_bundle_is_refused(tmp_path):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("readme.txt", "no bundle here")
    with expect_error(archive, "no MONAI bundle"):
        load_bundle(archive, extract_to=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- sizes of zips and the metadata's checks ---------------------------------------------------


def test_zip_bomb_bundle_is_refused_before_extracting(tmp_path, monkeypatch):
    """A bundle zip whose weights member unpacks to 64 MiB of zeros from about 64 KiB is
    refused before anything is written (given target and cache alike)."""
    bundle = tmp_path / "bundle"
    _third_party(bundle, tmp_path / "unused.txt")
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name in ("configs/metadata.json", "configs/inference.json"):
            zipped.write(bundle / name, name)
        with zipped.open("models/model.pt", "w") as member:
            for _ in range(64):
                member.write(bytes(1 << 20))
    monkeypatch.setenv("MTKD_CACHE", str(tmp_path / "cache"))
    for options in ({"extract_to": tmp_path / "out"}, {}):
        with expect_error(archive, "models/model.pt", "zip bomb"):
            load_bundle(archive, **options)
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").rglob("*.json"))


@pytest.mark.parametrize(
    ("sizes", "words"),
    [
        ([MAX_ZIP_MEMBER + 1], ("would unpack to", "more than 2.0 GiB")),
        ([MAX_ZIP_MEMBER, MAX_ZIP_MEMBER, 1], ("more than 4.0 GiB",)),
    ],
)
def test_zip_size_limits_hold_for_declared_sizes(tmp_path, sizes, words):
    """The limits apply to the sizes a zip declares (zipfile never unpacks more than that)."""
    members = []
    for number, size in enumerate(sizes):
        info = zipfile.ZipInfo(f"part{number}.bin")
        info.file_size = info.compress_size = size
        members.append(info)
    with expect_error(tmp_path / "x.zip", *words):
        check_zip_sizes(members, tmp_path / "x.zip")
    check_zip_sizes(members[:1] if len(sizes) > 2 else [], tmp_path / "x.zip")  # within limits


def test_edited_mtkd_section_is_refused(bundles, tmp_path):
    """The mtkd section records its checksum: an edit is refused; without the checksum (an
    older mtkd's bundle) a reversed HU window or labels short of the outputs are refused."""
    folder = _copy(bundles["unet3d"][1], tmp_path)
    metadata_file = folder / "configs" / "metadata.json"
    original = json.loads(metadata_file.read_text())
    assert original["mtkd"]["metadata_sha256"]
    edits = [
        (True, ("preprocessing", "hu_window"), [0, 80], ("mtkd.metadata_sha256", "changed")),
        (False, ("preprocessing", "hu_window"), [240, -160], ("mtkd.preprocessing.hu_window",)),
        (False, ("labels",), {"1": "liver"}, ("mtkd.labels", "output channel")),
    ]
    for keep, keys, value, words in edits:
        metadata = copy.deepcopy(original)
        section = metadata["mtkd"]
        if not keep:
            del section["metadata_sha256"]
        target = section
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        metadata_file.write_text(json.dumps(metadata))
        with expect_error(metadata_file, *words):
            load_bundle(folder)


def test_third_party_reversed_window_is_refused(tmp_path):
    bundle = tmp_path / "bundle"
    _third_party(bundle, tmp_path / "unused.txt")
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    scale = config["preprocessing"]["transforms"][4]
    scale["a_min"], scale["a_max"] = 164, -57
    config_file.write_text(json.dumps(config))
    with expect_error(config_file, "hu_window", "low < high"):
        load_bundle(bundle)
