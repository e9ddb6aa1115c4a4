"""Out-of-memory during inference falls back step by step (smaller batches, windows instead of
the whole volume, output on the CPU, then the CPU), with a warning; tested on the CPU by
injecting the error into a real network."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from mtkd.errors import MTKDError
from mtkd.infer.fallback import InferenceFallbackWarning, fallback_steps, is_out_of_memory
from mtkd.infer.memory import InferencePlan
from mtkd.infer.predictor import Predictor
from mtkd.modelfiles.model_io import load_model


class OutOfMemoryAbove(nn.Module):
    """A real network that raises CUDA's out-of-memory error for batches above ``limit``."""

    def __init__(self, inner: nn.Module, limit: int):
        super().__init__()
        self.inner, self.limit, self.batches = inner, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate (injected)")
        return self.inner(x)


@pytest.fixture(scope="module")
def ct(data_dir):
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    return sitk.RegionOfInterest(image, [80, 70, 24], [20, 15, 70])


def test_steps_halve_the_batch_then_leave_the_gpu(teacher_run):
    prep = load_model(teacher_run).prep
    slices = InferencePlan("slices", (64, 64), 8, 1.0, 1 << 30)
    steps = list(fallback_steps(slices, prep, torch.device("cuda")))
    assert [s.plan.batch for s in steps] == [8, 4, 2, 1, 1, 1]
    assert steps[0].reason == "" and all(s.reason for s in steps[1:])
    assert [s.device.type for s in steps[-2:]] == ["cuda", "cpu"]
    assert steps[-2].out_device == torch.device("cpu")
    whole = InferencePlan("whole", (1, 1, 96, 96, 64), 1, 1.0, 1 << 30)
    first, second = list(fallback_steps(whole, prep, torch.device("cpu")))
    assert (second.plan.mode, second.plan.shape, second.plan.batch) == (
        "sliding",
        tuple(prep.patch_size),
        1,
    )
    assert len(list(fallback_steps(slices, prep, torch.device("cpu")))) == 4  # no GPU steps


def test_out_of_memory_is_told_apart_from_other_errors():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: 9 GB"))
    assert not is_out_of_memory(RuntimeError("shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_prediction_survives_out_of_memory_with_smaller_batches(teacher_run, ct):
    reference = Predictor(load_model(teacher_run), "cpu").predict(ct)
    model = load_model(teacher_run)
    model.network = OutOfMemoryAbove(model.network, limit=2)
    predictor = Predictor(model, "cpu")
    with pytest.warns(InferenceFallbackWarning, match="retrying with 2-D slices"):
        prediction = predictor.predict(ct)
    assert max(model.network.batches) > 2 and model.network.batches[-1] <= 2
    assert "after running out of memory" in prediction.plan
    a = sitk.GetArrayFromImage(prediction.labelmap)
    b = sitk.GetArrayFromImage(reference.labelmap)
    assert np.count_nonzero(b) > 0
    assert np.mean(a != b) < 1e-3  # the same segmentation, computed in smaller batches


def test_other_errors_are_not_retried_and_endless_oom_is_reported(teacher_run, ct):
    model = load_model(teacher_run)
    model.network = OutOfMemoryAbove(model.network, limit=0)  # even one slice is too much
    with pytest.warns(InferenceFallbackWarning), pytest.raises(MTKDError, match="out of memory"):
        Predictor(model, "cpu").predict(ct)

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("shapes cannot be multiplied")

    model = load_model(teacher_run)
    inner = model.network
    model.network = nn.Sequential(inner, Broken())
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        Predictor(model, "cpu").predict(ct)
