"""Numerical check of an exported model against the PyTorch network it came from.

The check runs both on the same real CT sample, preprocessed exactly as at inference, and
reports the largest absolute difference of their logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from mtkd.data.preprocess import build_transforms, to_metatensor
from mtkd.errors import MTKDError
from mtkd.infer.inference import first_output, repeat_channels
from mtkd.modelfiles.model_io import LoadedModel

# Largest allowed |exported - pytorch| logit difference, relative to (1 + max |logit|).
DEFAULT_RELATIVE_BOUND = 1e-3


def sample_input(model: LoadedModel, image: sitk.Image, slices: int = 4) -> torch.Tensor:
    """A network input cut from a real CT: (B, C, X, Y) axial slices for 2-D models,
    (1, C, X, Y, Z) a central window for 3-D ones; sizes are multiples of the model's."""
    prep = model.prep
    volume = build_transforms(prep, with_label=False)({"image": to_metatensor(image)})["image"]
    volume = volume.as_tensor()  # (1, X, Y, Z)
    multiple = model.size_multiple
    if prep.dims == 2:
        depth = volume.shape[-1]
        start = max(0, depth // 2 - slices // 2)
        batch = volume[..., start : start + slices].permute(3, 0, 1, 2)  # (B, 1, X, Y)
        return repeat_channels(batch, prep.in_channels).contiguous()
    sizes = [
        max(multiple, min(p, s) // multiple * multiple)
        for p, s in zip(prep.patch_size, volume.shape[1:], strict=True)
    ]
    starts = [max(0, (s - w) // 2) for s, w in zip(volume.shape[1:], sizes, strict=True)]
    index = (slice(None), *(slice(b, b + w) for b, w in zip(starts, sizes, strict=True)))
    window = volume[index]
    pad = [w - s for s, w in zip(window.shape[1:], sizes, strict=True)]
    if any(pad):
        window = torch.nn.functional.pad(window, [p for d in reversed(pad) for p in (0, d)])
    return repeat_channels(window[None], prep.in_channels).contiguous()


@torch.no_grad()
def max_logit_difference(
    reference: torch.nn.Module, exported: Callable[[torch.Tensor], Any], sample: torch.Tensor
) -> tuple[float, float]:
    """(max |exported - reference|, max |reference|) over the logits of ``sample``."""
    reference.eval()
    expected = first_output(reference(sample)).float()
    actual = first_output(exported(sample))
    actual = torch.as_tensor(actual).float().to(expected.device)
    if actual.shape != expected.shape:
        raise MTKDError(
            f"exported model returns shape {tuple(actual.shape)}, "
            f"the PyTorch model {tuple(expected.shape)}"
        )
    return float((actual - expected).abs().max()), float(expected.abs().max())


def check_export(
    reference: torch.nn.Module,
    exported: Callable[[torch.Tensor], Any],
    sample: torch.Tensor,
    path: str | Path,
    relative_bound: float = DEFAULT_RELATIVE_BOUND,
    what: str = "exported model",
    sample_name: str = "the CT sample",
) -> dict[str, Any]:
    """Compare the logits; refuse the export (MTKDError naming ``path``, ``what`` and
    ``sample_name``) beyond the bound.

    Returns the record stored in the export's metadata: max_abs_diff, bound, sample_shape.
    """
    difference, scale = max_logit_difference(reference, exported, sample)
    bound = relative_bound * (1.0 + scale)
    if not difference <= bound:  # also refuses NaN
        raise MTKDError(
            f"{what} differs from the PyTorch model by {difference:.3g} "
            f"(allowed {bound:.3g}) on {sample_name}",
            path=path,
        )
    return {"max_abs_diff": difference, "bound": bound, "sample_shape": list(sample.shape)}
