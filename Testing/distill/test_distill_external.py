"""Teachers from where users have them: stored outputs of another tool (TotalSegmentator label
maps, nnU-Net-style probabilities), a TorchScript file, a teacher segmenting more structures
than the student, and checkpoints of a run in progress opened as models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import stop_at_batch
from monai.networks.nets import BasicUNet, UNet
from torch import nn

from mtkd.config import AugmentConfig, DataConfig, RunConfig
from mtkd.data.datasets import load_dataset
from mtkd.data.labels import LabelTable
from mtkd.data.loading import PatchDataset, SliceDataset, VolumeCache
from mtkd.data.preprocess import Preprocessing
from mtkd.data.segnrrd import write_seg_nrrd
from mtkd.data.stored_outputs import open_stored_outputs
from mtkd.distill.distiller import Distiller
from mtkd.distill.spec import OutputTerm
from mtkd.engine.teacher_source import pseudo_logits, teacher_transform
from mtkd.engine.trainer import Trainer, TrainingInterrupted
from mtkd.errors import MTKDError
from mtkd.infer.inference import first_output
from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.modelfiles.model_io import load_model, sha256_of
from mtkd.modelfiles.sources import load_any_model, load_checkpoint_model
from mtkd.run_folder import read_events

STRUCTURES = ["liver", "spleen", "kidney_right"]
OUTPUT_ONLY = {"loss": "pmd", "weight": 1.0, "temperature": 4.0}


def quiet(config: dict, run_dir: Path, **options) -> Trainer:
    return Trainer(
        RunConfig.from_dict(config), run_dir, progress=False, log=lambda _: None, **options
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model" / "model.pt", weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def ts_outputs(slab_dataset, tmp_path_factory) -> Path:
    """The slab cases' TotalSegmentator label maps (117 classes) as a teacher-output folder."""
    folder, _ = slab_dataset
    outputs = tmp_path_factory.mktemp("stored") / "totalseg"
    shutil.copytree(folder / "labels", outputs)
    return outputs


def one_hot_maps(slab_dataset, data_dir, names: list[str]) -> dict[str, tuple[np.ndarray, Path]]:
    """Per case: probabilities (C, z, y, x) that are the one-hot of ``names`` in the slab's
    label map (channel 0 background, channel c the c-th name), and the case's label file."""
    folder, _ = slab_dataset
    ids = json.loads((data_dir / "labels_total_v2.json").read_text())
    value_of = {name: int(value) for value, name in ids.items()}
    maps = {}
    for path in sorted((folder / "labels").glob("*.nii.gz")):
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        channels = [label == value_of[name] for name in names]
        background = ~np.any(channels, axis=0)
        maps[path.name[: -len(".nii.gz")]] = (
            np.stack([background, *channels]).astype(np.float32),
            path,
        )
    return maps


def cache_with(slab_dataset, data_dir, outputs: Path, **fields) -> tuple[VolumeCache, list[str]]:
    folder, split = slab_dataset
    dataset = load_dataset(folder, labels_json=data_dir / "labels_total_v2.json")
    table, mapping = dataset.labels.select(STRUCTURES)
    stored = open_stored_outputs(outputs, table, data_dir / "labels_total_v2.json")
    prep = Preprocessing.from_config(DataConfig(**fields))
    return VolumeCache(dataset.cases, dataset.labels, mapping, prep, teacher=stored), split["train"]


# ----------------------------------------------------------------------- the data path


def test_stored_label_maps_travel_with_image_and_label(slab_dataset, data_dir, ts_outputs):
    """The teacher's label maps are the cases' own label maps here, so after preprocessing,
    slicing, cropping and random flips/rotations each teacher map must equal the label."""
    augment = AugmentConfig(flip_prob=0.5, rotate90_prob=0.5)
    cache, train = cache_with(slab_dataset, data_dir, ts_outputs, dims=2, slice_size=[32, 32])
    slices = SliceDataset(cache, train, augment)
    for seed in (0, 1):
        slices.reseed(seed)
        for item in range(len(slices)):
            sample = slices[item]
            teacher = sample["teacher"]
            assert teacher.shape == (4, 32, 32) and teacher.dtype == torch.float32
            assert torch.equal(teacher.sum(0), torch.ones(32, 32))  # one-hot
            assert torch.equal(teacher.argmax(0), sample["label"][0])
    assert cache.reads == len(train)
    # 3-D: resampled (nearest), padded, cut into label-balanced patches at the same place
    cache, train = cache_with(
        slab_dataset, data_dir, ts_outputs, dims=3, spacing=[6.0, 6.0, 0.0], patch_size=[16, 16, 8]
    )
    patches = PatchDataset(cache, train, (16, 16, 8), 4, 3, augment)
    patches.reseed(0)
    for item in range(len(patches)):
        sample = patches[item]
        assert sample["teacher"].shape == (4, 16, 16, 8)
        assert torch.equal(sample["teacher"].argmax(0), sample["label"][0])


def test_probability_maps_npz_and_4d_nifti(slab_dataset, data_dir, tmp_path):
    """nnU-Net-style npz (C, z, y, x) and 4-D NIfTI (x, y, z, C) probabilities of a teacher
    with other structures in another order: matched by name, resized bilinearly."""
    names = ["spleen", "stomach", "liver", "kidney_right", "kidney_left"]
    labels = {"background": 0, **{name: i for i, name in enumerate(names, start=1)}}
    npz, nifti = tmp_path / "npz", tmp_path / "nifti"
    for folder in (npz, nifti):
        folder.mkdir()
        (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    for case_id, (maps, label_file) in one_hot_maps(slab_dataset, data_dir, names).items():
        np.savez_compressed(npz / f"{case_id}.npz", probabilities=maps.astype(np.float16))
        reference = sitk.ReadImage(str(label_file))
        volumes = []
        for channel in maps:
            volume = sitk.GetImageFromArray(channel)
            volume.CopyInformation(reference)
            volumes.append(volume)
        sitk.WriteImage(sitk.JoinSeries(volumes), str(nifti / f"{case_id}.nii.gz"))
    prep = {"dims": 2, "slice_size": [32, 32]}
    a, train = cache_with(slab_dataset, data_dir, npz, **prep)
    b, _ = cache_with(slab_dataset, data_dir, nifti, **prep)
    agree = total = 0
    fractional = False
    for case_id in train:
        teacher, label = a[case_id].teacher, a[case_id].label
        assert teacher.shape == (3, *label.shape[1:])  # liver, spleen, kidney_right
        assert torch.allclose(teacher, b[case_id].teacher, atol=1e-3)
        fractional |= bool(((teacher > 0.05) & (teacher < 0.95)).any())
        full = torch.cat([(1 - teacher.sum(0, keepdim=True)).clamp_min(0), teacher])
        assert torch.allclose(full.sum(0), torch.ones_like(full[0]), atol=1e-3)
        agree += int((full.argmax(0) == label[0]).sum())
        total += label.numel()
    assert fractional  # bilinear, not nearest
    assert agree / total > 0.95


def test_slicer_segmentations_and_totalsegmentator_mask_folders(slab_dataset, data_dir, tmp_path):
    """Self-describing outputs: .seg.nrrd files (segment names, own values) and per-case
    folders of <structure>.nii.gz masks; each lands exactly on the label."""
    folder, _ = slab_dataset
    ids = json.loads((data_dir / "labels_total_v2.json").read_text())
    value_of = {name: int(value) for value, name in ids.items()}
    own = LabelTable({7: "kidney_right", 9: "liver", 11: "spleen", 12: "stomach"})
    seg, masks = tmp_path / "seg", tmp_path / "masks"
    seg.mkdir()
    for path in sorted((folder / "labels").glob("*.nii.gz")):
        case_id = path.name[: -len(".nii.gz")]
        label = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(label)
        relabelled = np.zeros_like(array)
        for value, name in own.items():
            relabelled[array == value_of[name]] = value
            mask = sitk.GetImageFromArray((array == value_of[name]).astype(np.uint8))
            mask.CopyInformation(label)
            (masks / case_id).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(mask, str(masks / case_id / f"{name}.nii.gz"))
        image = sitk.GetImageFromArray(relabelled)
        image.CopyInformation(label)
        write_seg_nrrd(image, own, seg / f"{case_id}.seg.nrrd")
    for outputs in (seg, masks):
        cache, train = cache_with(slab_dataset, data_dir, outputs, dims=2, slice_size=[32, 32])
        for case_id in train:
            assert torch.equal(cache[case_id].teacher, cache[case_id].label), (outputs, case_id)


def test_stored_output_problems_name_the_folder_case_or_file(
    slab_dataset, data_dir, ts_outputs, make_config, tmp_path
):
    _, split = slab_dataset
    outputs = tmp_path / "outputs"
    shutil.copytree(ts_outputs, outputs)
    missing = split["train"][2]
    (outputs / f"{missing}.nii.gz").unlink()
    config = make_config(
        "distill", train_on="train", distill={"teacher": str(outputs), "output": OUTPUT_ONLY}
    )
    with pytest.raises(MTKDError) as error:
        quiet(config, tmp_path / "run").run()
    assert str(outputs) in str(error.value) and missing in str(error.value)

    shutil.copy(ts_outputs / f"{missing}.nii.gz", outputs / f"{missing}.nii.gz")
    moved = sitk.ReadImage(str(outputs / f"{missing}.nii.gz"))
    moved.SetOrigin([v + 5.0 for v in moved.GetOrigin()])
    sitk.WriteImage(moved, str(outputs / f"{missing}.nii.gz"))
    cache, _ = cache_with(slab_dataset, data_dir, outputs, dims=2, slice_size=[32, 32])
    with pytest.raises(MTKDError, match="grid") as error:
        cache[missing]
    assert str(outputs / f"{missing}.nii.gz") in str(error.value)

    folder, _ = slab_dataset
    dataset = load_dataset(folder, labels_json=data_dir / "labels_total_v2.json")
    table, _ = dataset.labels.select(["liver", "kidney_left", "stomach"])
    (outputs / "labels.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    with pytest.raises(MTKDError) as error:
        open_stored_outputs(outputs, table)
    assert "kidney_left, stomach" in str(error.value)
    assert str(outputs / "labels.json") in str(error.value)


# ----------------------------------------------------------------------- distillation


def test_distillation_from_stored_totalsegmentator_outputs(
    slab_dataset, ts_outputs, make_config, tmp_path
):
    """(a) Output term only from stored TotalSegmentator label maps (of the training cases
    only): it trains, changes the weights, the lineage says stored; at scale 0 it is plain
    training, bit for bit."""
    _, split = slab_dataset
    outputs = tmp_path / "totalseg"
    outputs.mkdir()
    for case_id in split["train"]:
        shutil.copy(ts_outputs / f"{case_id}.nii.gz", outputs)
    common = dict(train_on="student_train", train__epochs=1)
    kd = make_config("distill", distill={"teacher": str(outputs), "output": OUTPUT_ONLY}, **common)
    zero = make_config(
        "distill",
        distill={"teacher": str(outputs), "output": OUTPUT_ONLY, "scale": 0.0},
        **common,
    )
    plain = make_config("train", multitask={"reconstruction": "none"}, **common)
    result = quiet(kd, tmp_path / "kd").run()
    quiet(zero, tmp_path / "zero").run()
    quiet(plain, tmp_path / "plain").run()
    metrics = [e for e in read_events(tmp_path / "kd" / "events.jsonl") if e["type"] == "metrics"]
    assert all(m["pmd"] > 0 and np.isfinite(m["loss"]) for m in metrics)
    assert not same_weights(weights(tmp_path / "kd"), weights(tmp_path / "zero"))
    assert same_weights(weights(tmp_path / "zero"), weights(tmp_path / "plain"))
    lineage = load_model(result.model_dir).metadata["lineage"]
    assert lineage["distilled"] is True
    assert lineage["teacher"] == {"path": str(outputs.resolve()), "kind": "stored"}
    state = load_checkpoint(tmp_path / "kd" / "checkpoints" / "last.pt")
    assert state["model_metadata"]["lineage"]["teacher"]["kind"] == "stored"
    assert load_model(tmp_path / "zero").metadata["lineage"]["distilled"] is False


@pytest.mark.parametrize(
    ("distill", "names"),
    [
        ({"preset": "thesis"}, "E-E, B-B, D-D"),
        (
            {
                "pairs": [
                    {"name": "B-B", "student": "bottleneck", "teacher": "x", "weight": 0.0},
                    {"name": "D-D", "student": "dec2", "teacher": "y", "weight": 0.1},
                ],
                "output": OUTPUT_ONLY,
            },
            "(D-D)",
        ),
    ],
)
def test_feature_terms_with_stored_outputs_are_refused(
    ts_outputs, make_config, tmp_path, distill, names
):
    """(b) Feature-level terms need the teacher network."""
    config = make_config("distill", distill={"teacher": str(ts_outputs), **distill})
    with pytest.raises(MTKDError) as error:
        quiet(config, tmp_path / "run").run()
    message = str(error.value)
    assert names in message and "need the teacher network" in message
    assert "stored outputs" in message and str(ts_outputs) in message
    assert "set their weights to 0 or use our run folder/MONAI bundle" in message
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


class _Segmentation(nn.Module):
    """The segmentation logits (B, C, *S) of a (multi-task) network."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_output(self.network(x))


def test_torchscript_teacher_with_embedded_metadata(teacher_run, make_config, tmp_path):
    """(c) A traced TorchScript teacher (metadata as an extra file): the output term trains and
    gives the weights of the same distillation from the run folder; feature terms are refused."""
    teacher = load_model(teacher_run)
    example = torch.rand(2, teacher.prep.in_channels, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(_Segmentation(teacher.network).eval(), (example,))
    keys = ("name", "labels", "preprocessing", "activation")
    metadata = {key: teacher.metadata[key] for key in keys}
    script = tmp_path / "teacher.ts"
    torch.jit.save(traced, str(script), _extra_files={"mtkd_model.json": json.dumps(metadata)})
    common = dict(train_on="student_train", train__epochs=1)
    result = quiet(
        make_config("distill", distill={"teacher": str(script), "output": OUTPUT_ONLY}, **common),
        tmp_path / "ts",
    ).run()
    quiet(
        make_config(
            "distill", distill={"teacher": str(teacher_run), "output": OUTPUT_ONLY}, **common
        ),
        tmp_path / "run",
    ).run()
    a, b = weights(tmp_path / "ts"), weights(tmp_path / "run")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    metrics = [e for e in read_events(tmp_path / "ts" / "events.jsonl") if e["type"] == "metrics"]
    assert metrics[0]["pmd"] > 0
    lineage = load_model(result.model_dir).metadata["lineage"]["teacher"]
    assert lineage["kind"] == "torchscript" and lineage["weights_sha256"] == sha256_of(script)
    config = make_config("distill", distill={"teacher": str(script), "preset": "thesis"})
    with pytest.raises(MTKDError, match="E-E, B-B, D-D.*need the teacher network.*TorchScript"):
        quiet(config, tmp_path / "refused").run()


def test_teacher_with_more_structures_matches_by_name(teacher_run, make_config, tmp_path):
    """(d) The teacher segments liver, spleen and kidney_right; a student of spleen and liver
    (another order) distils from it, with feature terms; a structure it lacks is an error."""
    config = make_config(
        "distill",
        data__structures=["spleen", "liver"],
        train__epochs=1,
        distill={"teacher": str(teacher_run), "preset": "thesis"},
    )
    trainer = quiet(config, tmp_path / "subset")
    trainer.run()
    assert (
        trainer.models.distiller is not None
        and trainer.models.distiller.teacher_transform is not None
    )
    metrics = [
        e for e in read_events(tmp_path / "subset" / "events.jsonl") if e["type"] == "metrics"
    ]
    assert all(metrics[0][term] > 0 for term in ("E-E", "B-B", "D-D", "pmd"))

    # the matched target is the teacher's own probabilities of those structures
    teacher = load_model(teacher_run)
    matched = teacher_transform(teacher, trainer.data.labels, "softmax")
    logits = torch.randn(2, 4, 8, 8)  # background, liver, spleen, kidney_right
    p = torch.softmax(logits, 1)
    expected = torch.stack([p[:, 0] + p[:, 3], p[:, 2], p[:, 1]], 1)
    target = torch.softmax(matched(logits) / 4.0, 1)
    softened = expected ** (1 / 4.0)
    assert torch.allclose(target, softened / softened.sum(1, keepdim=True), atol=1e-5)
    assert torch.allclose(torch.softmax(pseudo_logits(expected, "softmax"), 1), expected)
    two = expected[:, :2] / expected[:, :2].sum(1, keepdim=True)  # background, one structure
    soft = two ** (1 / 4.0)
    sigmoid_target = torch.sigmoid(pseudo_logits(two, "sigmoid") / 4.0)
    assert torch.allclose(sigmoid_target, soft[:, 1:] / soft.sum(1, keepdim=True), atol=1e-5)

    config["data"]["structures"] = ["liver", "kidney_left"]
    with pytest.raises(MTKDError) as error:
        quiet(config, tmp_path / "missing").run()
    assert "kidney_left" in str(error.value) and str(teacher.folder) in str(error.value)


def test_teacher_taking_three_channels_gets_the_ct_repeated():
    teacher = BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, features=(4,) * 6)
    student = UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0)
    x = torch.rand(2, 1, 32, 32)
    distiller = Distiller(student, teacher, [], OutputTerm(), x, teacher_in_channels=3)
    out = distiller(x)
    with torch.no_grad():
        assert torch.equal(out.teacher_logits, teacher(x.repeat(1, 3, 1, 1)))
    assert out.terms["pmd"] > 0


def test_checkpoint_of_a_stopped_run_opens_as_a_model(ts_outputs, make_config, tmp_path):
    """(e) A distillation stopped mid-run: its last checkpoint opens as a model whose outputs
    equal the network's at that checkpoint."""
    config = make_config(
        "distill", train__epochs=3, distill={"teacher": str(ts_outputs), "output": OUTPUT_ONLY}
    )
    trainer = quiet(config, tmp_path / "run")
    stop_at_batch(trainer, 3)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    assert load_checkpoint(checkpoint)["step_in_epoch"] == 3
    assert not (tmp_path / "run" / "model").exists()
    device = trainer.device
    for model in (load_checkpoint_model(checkpoint, device), load_any_model(checkpoint, device)):
        assert model.labels == trainer.data.labels and model.activation == trainer.data.activation
        assert model.prep == trainer.data.prep
        assert model.metadata["lineage"]["teacher"]["kind"] == "stored"
        image = trainer.data.cache[trainer.data.split.val[0]].image  # (1, X, Y, Z), a real CT
        slices = image.permute(3, 0, 1, 2).to(device)
        trainer.models.network.eval()
        with torch.no_grad():
            expected = trainer.models.network(slices)
            got = model.network(slices)
        assert torch.allclose(got, expected, rtol=0.0, atol=1e-6)
        assert not torch.equal(got, torch.zeros_like(got))
