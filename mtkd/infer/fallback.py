"""Out-of-memory fallback for inference: smaller batches, then output on the CPU, then the CPU.

A plan from :func:`mtkd.infer.memory.plan_inference` is an estimate; when the device still runs
out of memory, :func:`fallback_steps` gives what to try next, step by step:

1. the same mode with half the windows or slices per batch, down to one (a whole-volume pass
   becomes sliding windows of the patch size, one per batch);
2. the same, with the probabilities stitched in CPU memory instead of on the device;
3. the whole prediction on the CPU.

Each step after the first is announced by a warning (``InferenceFallbackWarning``) naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mtkd.data.preprocess import Preprocessing
from mtkd.infer.memory import InferencePlan


class InferenceFallbackWarning(UserWarning):
    """Inference ran out of memory and continued with a smaller plan."""


@dataclass(frozen=True)
class FallbackStep:
    """A plan, the device that runs the network and where the output is stitched (None: the
    predictor decides), and why this step is taken."""

    plan: InferencePlan
    device: torch.device
    out_device: torch.device | None
    reason: str


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's "can't allocate" errors."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _smaller(plan: InferencePlan, prep: Preprocessing) -> InferencePlan | None:
    if plan.mode == "whole":
        return dataclasses.replace(plan, mode="sliding", shape=tuple(prep.patch_size), batch=1)
    if plan.batch > 1:
        return dataclasses.replace(plan, batch=max(1, plan.batch // 2))
    return None


def fallback_steps(
    plan: InferencePlan, prep: Preprocessing, device: torch.device
) -> Iterator[FallbackStep]:
    """The first step is ``plan`` as it is; each later step is one of the fallbacks above."""
    yield FallbackStep(plan, device, None, "")
    current = plan
    while (smaller := _smaller(current, prep)) is not None:
        current = smaller
        yield FallbackStep(
            current, device, None, f"out of memory; retrying with {current.describe()}"
        )
    cpu = torch.device("cpu")
    if device.type != "cpu":
        yield FallbackStep(
            current, device, cpu, "out of memory; stitching the output in CPU memory"
        )
        yield FallbackStep(current, cpu, cpu, "out of memory on the GPU; running on the CPU")
