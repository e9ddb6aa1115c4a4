"""CUDA code paths: GPU preprocessing and inference (bf16 autocast), mixed-precision training.

These run where a CUDA GPU is present (the project's GPU machine: ``bench/gpu_run.sh``); on
machines without one they are skipped, and the same code paths run on the CPU in the other
test files.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mtkd.config import RunConfig
from mtkd.data.image_io import read_image
from mtkd.data.labels import LabelTable
from mtkd.data.preprocess import Preprocessing
from mtkd.engine.trainer import Trainer, resume_run
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import export_model, load_model
from mtkd.models import build_network
from mtkd.run_folder import read_events

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def agreement(a: sitk.Image, b: sitk.Image) -> float:
    """Fraction of voxels with the same label (both maps on the same grid)."""
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    return float(np.mean(sitk.GetArrayViewFromImage(a) == sitk.GetArrayViewFromImage(b)))


def test_2d_predictor_on_gpu_matches_cpu(teacher_run, data_dir):
    image = read_image(data_dir / "abdomen_ct.nii.gz")
    cpu = Predictor(load_model(teacher_run), "cpu").predict(image)
    fp32 = Predictor(load_model(teacher_run, "cuda"), "cuda", amp=False).predict(image)
    bf16 = Predictor(load_model(teacher_run, "cuda"), "cuda").predict(image)
    assert fp32.labelmap.GetOrigin() == image.GetOrigin()
    assert agreement(cpu.labelmap, fp32.labelmap) > 0.999
    assert agreement(cpu.labelmap, bf16.labelmap) > 0.99


def test_3d_predictor_on_gpu_matches_cpu(data_dir, tmp_path):
    torch.manual_seed(0)
    params = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": [8, 16, 32],
        "num_res_units": 1,
    }
    network = build_network("unet", **params)
    prep = Preprocessing(
        dims=3,
        hu_window=(-200.0, 300.0),
        spacing=(2.0, 2.0, 2.0),
        crop_foreground=False,
        slice_size=(64, 64),
        patch_size=(64, 64, 64),
        in_channels=1,
    )
    export_model(
        network,
        tmp_path / "model",
        spec={"name": "unet", "params": params, "reconstruction": "none"},
        labels=LabelTable({1: "liver", 2: "spleen"}),
        prep=prep,
        activation="softmax",
        lineage={"kind": "test"},
    )
    image = read_image(data_dir / "abdomen_ct.nii.gz")
    cpu = Predictor(load_model(tmp_path / "model"), "cpu").predict(image)
    gpu = Predictor(load_model(tmp_path / "model", "cuda"), "cuda", amp=False).predict(image)
    assert agreement(cpu.labelmap, gpu.labelmap) > 0.999
    assert gpu.peak_memory_bytes > 0


def test_postprocessing_and_transfers_on_gpu(teacher_run, data_dir):
    """The label map stays on the GPU for post-processing (torch ops there) and reaches the
    host through pinned memory: the same map as SciPy's on the CPU, whatever the device."""
    from mtkd.infer.postprocess import DEVICE_BYTES_PER_VOXEL, PostProcessing, StructureRule
    from mtkd.infer.transfers import to_device, to_host

    rng = np.random.default_rng(0)
    labels = np.zeros((60, 50, 40), np.uint8)
    labels[10:30, 10:30, 5:25] = 1
    labels[40:44, 5:9, 30:33] = 1  # an island
    labels[20, 20, 15] = 0  # a hole
    labels[rng.random(labels.shape) < 0.002] = 2  # specks
    rules = PostProcessing({1: StructureRule(largest_only=True, fill_holes=True),
                            2: StructureRule(min_volume_ml=0.002)})  # fmt: skip
    on_gpu = to_device(torch.from_numpy(labels), torch.device("cuda"))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    cleaned = rules.apply(on_gpu, (1, 1, 1))
    working = torch.cuda.max_memory_allocated() - before
    assert working <= DEVICE_BYTES_PER_VOXEL * labels.size  # the bound apply_within plans with
    np.testing.assert_array_equal(to_host(cleaned), rules.apply(labels, (1, 1, 1)))
    image = read_image(data_dir / "abdomen_ct.nii.gz")
    model = load_model(teacher_run, "cuda")
    every = PostProcessing({v: StructureRule(largest_only=True) for v in model.labels.label_values})
    cpu = Predictor(load_model(teacher_run), "cpu", postprocessing=every).predict(image)
    gpu = Predictor(model, "cuda", amp=False, postprocessing=every).predict(image)
    assert agreement(cpu.labelmap, gpu.labelmap) > 0.999


def test_distillation_with_mixed_precision_on_gpu(make_config, teacher_run, tmp_path):
    config = make_config(
        "distill",
        name="gpu-student",
        model={"name": "thesis_unet", "params": {"channels": [4, 8], "bottleneck": 16}},
        distill={"teacher": str(teacher_run), "preset": "thesis"},
    )
    config["train"].update({"device": "cuda", "amp": True, "epochs": 2})
    result = Trainer(RunConfig.from_dict(config), tmp_path / "run", progress=False).run()
    metrics = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["type"] == "metrics"]
    assert len(metrics) == 2
    assert all(np.isfinite(e["loss"]) for e in metrics)
    assert (result.model_dir / "model.pt").is_file()
    assert resume_run(tmp_path / "run", progress=False).epochs == 2  # finished: nothing to redo
