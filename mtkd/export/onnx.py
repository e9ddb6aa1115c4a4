"""ONNX export with dynamic batch and spatial sizes, checked under onnxruntime.

The torch.export-based exporter (``dynamo=True``) runs first; should it fail for a network
(export error, invalid graph, or logits off on either check size), the TorchScript-based
exporter (``dynamo=False``) is tried. The metadata says which one wrote the file and why the
first one was passed over. ``OUT/model.onnx`` also carries the metadata (without the
SHA-256) as its metadata_props entry ``mtkd_model``.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any

import onnx
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
from mtkd.export.verify import DEFAULT_RELATIVE_BOUND, sample_input
from mtkd.modelfiles.model_io import LoadedModel
from mtkd.modelfiles.onnx import METADATA_PROP, OnnxNetwork, open_session

ONNX_RELATIVE_BOUND = DEFAULT_RELATIVE_BOUND
DYNAMO_OPSET = 18
TORCHSCRIPT_OPSET = 17
EXPORTERS = ("dynamo", "torchscript")
INPUT, OUTPUT = "image", "logits"
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _export_dynamo(network: torch.nn.Module, sample: torch.Tensor, path: Path, text: str) -> int:
    """torch.export-based export of ``network`` (B, C, *S) with batch and S dynamic."""
    dynamic = torch.export.Dim.DYNAMIC
    axes = {0: dynamic, **{axis: dynamic for axis in range(2, sample.dim())}}
    program = torch.onnx.export(
        network,
        (sample,),
        None,
        dynamo=True,
        verbose=False,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=(axes,),
        opset_version=DYNAMO_OPSET,
    )
    program.model.metadata_props[METADATA_PROP] = text
    program.save(str(path), external_data=False)
    return DYNAMO_OPSET


def _export_torchscript(
    network: torch.nn.Module, sample: torch.Tensor, path: Path, text: str
) -> int:
    """TorchScript-based export of ``network`` with named dynamic batch and spatial axes."""
    names = {0: "batch", **{axis: f"size{axis - 1}" for axis in range(2, sample.dim())}}
    torch.onnx.export(
        network,
        (sample,),
        str(path),
        dynamo=False,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_axes={INPUT: names, OUTPUT: names},
        opset_version=TORCHSCRIPT_OPSET,
    )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_PROP, text
    onnx.save(proto, str(path))
    return TORCHSCRIPT_OPSET


_EXPORT = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _reason(error: BaseException) -> str:
    """One line on why an exporter failed: the innermost cause's first line."""
    if isinstance(error, MTKDError):
        return error.problem
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip() if lines else ''}"[:300]


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence warnings and the exporters' log output (graph dumps on failure): a failure
    is reported once, in the metadata or the MTKDError."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        # torch.export prints a partial graph to stderr when it fails.
        with warnings.catch_warnings(), torch.no_grad(), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(
    model: LoadedModel,
    out: str | Path,
    sample_image: sitk.Image | str | Path,
    *,
    sample_name: str | None = None,
    exporter: str = "auto",
) -> dict[str, Any]:
    """Export ``model`` as ``out/model.onnx`` + ``out/mtkd_model.json``; returns the metadata.

    ``exporter``: "auto" (dynamo, then the TorchScript-based exporter), "dynamo" or
    "torchscript". Each candidate file must pass onnx.checker and match the PyTorch logits
    under onnxruntime (CUDA provider first when available) on the real CT ``sample_image`` and
    on a second input of another batch and spatial size; else MTKDError and ``out`` unchanged.
    """
    if exporter not in ("auto", *EXPORTERS):
        raise MTKDError(f"unknown ONNX exporter {exporter!r}; choose auto, dynamo or torchscript")
    out = Path(out)
    check_output_folder(out, "onnx")
    image, described = load_sample(sample_image)
    reference = pytorch_network(model, out)
    sample = sample_input(model, image)
    wrapper = SegmentationOnly(reference).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failures: list[str] = []
    with staging_folder(out) as staging:
        staged = staging / WEIGHTS_FILES["onnx"]
        for name in EXPORTERS if exporter == "auto" else (exporter,):
            metadata = export_metadata(model, "onnx")
            metadata["exporter"] = {"name": f"torch.onnx ({name})", "failed": list(failures)}
            try:
                with _quiet_exporter():
                    metadata["exporter"]["opset"] = _EXPORT[name](
                        wrapper, sample, staged, metadata_text(metadata)
                    )
                onnx.checker.check_model(str(staged))
                network = OnnxNetwork(open_session(staged, device), staged)
                check = verify_both_sizes(
                    reference,
                    network,
                    sample,
                    model.size_multiple,
                    out,
                    ONNX_RELATIVE_BOUND,
                    sample_name or described,
                )
            except Exception as error:  # noqa: BLE001 - exporters fail in many ways
                failures.append(f"{name}: {_reason(error)}")
                staged.unlink(missing_ok=True)
                continue
            check["providers"] = network.providers
            metadata["export_check"] = check
            return publish_export(staged, out, metadata)
    raise MTKDError(f"ONNX export failed ({'; '.join(failures)})", out)
