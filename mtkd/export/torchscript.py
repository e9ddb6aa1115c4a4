"""TorchScript export: a traced, segmentation-only network that carries its own metadata.

``OUT/model.ts`` embeds ``mtkd_model.json`` (without the SHA-256) as a TorchScript extra
file, so the file alone still says its labels, preprocessing and activation.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import torch

from mtkd.errors import MTKDError
from mtkd.export.common import (
    WEIGHTS_FILES,
    SegmentationOnly,
    check_output_folder,
    export_metadata,
    load_sample,
    metadata_text,
    publish_export,
    pytorch_network,
    staging_folder,
    verify_both_sizes,
)
from mtkd.export.verify import sample_input
from mtkd.modelfiles.model_io import METADATA, LoadedModel

# A trace replays the same kernels, so the loaded-back file must match very closely.
TORCHSCRIPT_RELATIVE_BOUND = 1e-5


def trace_segmentation(network: torch.nn.Module, sample: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace :class:`SegmentationOnly` of ``network`` (eval mode) on ``sample`` (B, C, *S)."""
    wrapper = SegmentationOnly(network).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # Deprecation notices and TracerWarnings (shape checks frozen into the trace): the
        # check on a second input size below catches a trace that only fits its own size.
        warnings.simplefilter("ignore")
        return torch.jit.trace(wrapper, (sample,), check_trace=True)


def export_torchscript(
    model: LoadedModel,
    out: str | Path,
    sample_image: sitk.Image | str | Path,
    *,
    sample_name: str | None = None,
) -> dict[str, Any]:
    """Export ``model`` as ``out/model.ts`` + ``out/mtkd_model.json``; returns the metadata.

    The trace is loaded back and its logits compared with the PyTorch network's on the real
    CT ``sample_image`` (and on a second input of another size) before any file reaches
    ``out``; a difference beyond the bound raises MTKDError and leaves ``out`` unchanged.
    """
    out = Path(out)
    check_output_folder(out, "torchscript")
    image, described = load_sample(sample_image)
    reference = pytorch_network(model, out)
    sample = sample_input(model, image)
    metadata = export_metadata(model, "torchscript")
    metadata["exporter"] = {"name": "torch.jit.trace"}
    try:
        traced = trace_segmentation(reference, sample)
    except Exception as error:  # noqa: BLE001 - tracing failures come in many types
        raise MTKDError(
            f"could not trace the network to TorchScript ({type(error).__name__}: {error})", out
        ) from None
    with staging_folder(out) as staging:
        staged = staging / WEIGHTS_FILES["torchscript"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(traced, str(staged), _extra_files={METADATA: metadata_text(metadata)})
            loaded = torch.jit.load(str(staged), map_location="cpu").eval()
        metadata["export_check"] = verify_both_sizes(
            reference,
            loaded,
            sample,
            model.size_multiple,
            out,
            TORCHSCRIPT_RELATIVE_BOUND,
            sample_name or described,
        )
        return publish_export(staged, out, metadata)
