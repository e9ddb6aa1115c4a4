"""ONNX Runtime as a CPU backend for PyTorch models, chosen per model when it is loaded.

:func:`network_for_backend` gives a model whose network runs under "torch" (as loaded),
"onnxruntime" (the cached ONNX export of its weights, :mod:`mtkd.export.ort_cache`, in a CPU
session with torch's thread count) or "auto": on the CPU, the faster of the two on a probe
input shaped like what :class:`mtkd.infer.predictor.Predictor` gives the network
(:func:`probe_input`); torch on other devices. The onnxruntime network must match the PyTorch
logits on that probe within the ONNX export's bound (:data:`mtkd.export.onnx.ONNX_RELATIVE_BOUND`
relative to 1 + max |logit|), or it is refused: an MTKDError for "onnxruntime", torch with the
reason for "auto". Models that are already TorchScript or ONNX run as loaded.

Wiring: ``model, backend_used = network_for_backend(model, backend, device)`` before
``Predictor(model, device)``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtkd.errors import MTKDError, error_summary
from mtkd.export.ort_cache import cached_onnx_export, remove_entry
from mtkd.export.verify import check_export
from mtkd.infer.inference import first_output
from mtkd.infer.memory import (
    CPU_SLICE_BATCH_BYTES,
    activation_bytes_per_voxel,
    configure_cpu_threads,
    free_memory_bytes,
    has_extent_dependent_norm,
    plan_inference,
    record_activation_bytes,
    round_up,
)
from mtkd.modelfiles.model_io import LoadedModel
from mtkd.modelfiles.onnx import OnnxNetwork

BACKENDS = ("torch", "onnxruntime", "auto")
NEEDED_PACKAGES = ("onnx", "onnxruntime")
TIMING_REPEATS = 3
# Largest 3-D probe (voxels per forward pass): a whole-volume plan is probed on a volume of
# the same proportions scaled down to this, so that choosing costs seconds, not minutes.
PROBE_VOXELS = 96**3
# A typical CT's extent (512 x 0.78 mm in-plane, 224 x 1.5 mm slices) and slice count: the
# volume a 3-D probe is planned for, and the slices a 2-D slice batch is planned for.
TYPICAL_CT_MM = (400.0, 400.0, 336.0)
TYPICAL_CT_VOXELS = (512, 512, 224)


class OrtCpuNetwork(OnnxNetwork):
    """An ONNX file in an onnxruntime CPU session with ``threads`` intra-op threads, called
    like the PyTorch network: x (B, C_in, *S) -> float32 logits (B, C_out, *S) on x's device.
    An allocation failure is raised as an out-of-memory RuntimeError (the predictor's
    fallback then tries a smaller plan)."""

    def __init__(self, path: Path, threads: int):
        super().__init__(open_cpu_session(path, threads), path)
        self.threads = threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return super().__call__(x)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types
            if "allocat" in str(error).lower():
                raise RuntimeError(
                    f"out of memory in onnxruntime: {error_summary(error)}"
                ) from None
            raise

    forward = __call__


def open_cpu_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session of ``path`` (intra-op ``threads``, one inter-op thread);
    MTKDError naming ``path`` when it cannot be opened."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types
        raise MTKDError(f"onnxruntime cannot open it: {error_summary(error)}", path) from None


def missing_packages() -> list[str]:
    """The packages of :data:`NEEDED_PACKAGES` that are not installed."""
    return [name for name in NEEDED_PACKAGES if importlib.util.find_spec(name) is None]


def is_torch_network(network: object) -> bool:
    """An ``nn.Module`` that is not TorchScript: what can be exported to ONNX."""
    return isinstance(network, nn.Module) and not isinstance(network, torch.jit.ScriptModule)


def network_kind(network: object) -> str:
    """What a model's network is, in words."""
    if isinstance(network, OnnxNetwork):
        return "an ONNX model"
    if isinstance(network, torch.jit.ScriptModule):
        return "a TorchScript model"
    if isinstance(network, nn.Module):
        return "a PyTorch network"
    return f"a {type(network).__name__}"


def refusal_of(model: LoadedModel) -> str | None:
    """Why the onnxruntime backend cannot take ``model`` before trying: packages missing, or
    a network that is not PyTorch; None when it can try."""
    missing = missing_packages()
    if missing:
        return f"the onnxruntime backend needs {' and '.join(missing)} (pip install 'mtkd[onnx]')"
    if not is_torch_network(model.network):
        return (
            "the onnxruntime backend exports a PyTorch network to ONNX; this model is "
            f"{network_kind(model.network)} (use the model or run folder it came from)"
        )
    return None


# ------------------------------------------------------------------------------ probe
def _typical_grid(model: LoadedModel) -> tuple[int, int, int]:
    """The model grid (X, Y, Z) of a typical CT: 2-D slices of ``slice_size``; 3-D the
    typical extent at the model's spacing (the typical voxels at native spacing)."""
    prep = model.prep
    if prep.dims == 2:
        return (*(int(s) for s in prep.slice_size), TYPICAL_CT_VOXELS[2])
    if not prep.spacing:
        return TYPICAL_CT_VOXELS
    return tuple(math.ceil(mm / s) for mm, s in zip(TYPICAL_CT_MM, prep.spacing))


def _scaled_down(spatial: tuple[int, ...], multiple: int) -> tuple[int, ...]:
    """``spatial`` scaled to at most :data:`PROBE_VOXELS`, each a multiple of ``multiple``."""
    factor = min(1.0, (PROBE_VOXELS / math.prod(spatial)) ** (1 / len(spatial)))
    return tuple(max(multiple, int(s * factor) // multiple * multiple) for s in spatial)


def probe_shape(model: LoadedModel, network: nn.Module) -> tuple[int, ...]:
    """(B, C, *S) of one forward pass the CPU predictor plans for a typical CT with its
    default budget (:func:`mtkd.infer.memory.plan_inference`): 2-D a slice batch; 3-D a
    window batch or the whole volume, scaled down to :data:`PROBE_VOXELS`."""
    prep, multiple = model.prep, model.size_multiple
    per_voxel = activation_bytes_per_voxel(network, prep.in_channels, prep.dims, multiple, "cpu")
    extent = has_extent_dependent_norm(network, model.metadata.get("network"))
    plan = plan_inference(
        _typical_grid(model),
        prep,
        per_voxel,
        free_memory_bytes("cpu") // 2,
        multiple,
        CPU_SLICE_BATCH_BYTES,
        extent_dependent=extent,
    )
    channels = prep.in_channels
    if plan.mode == "slices":
        return (plan.batch, channels, *(round_up(s, multiple) for s in plan.shape))
    if plan.mode == "whole":
        return (1, channels, *_scaled_down(plan.shape[2:], multiple))
    batch = min(plan.batch, max(1, PROBE_VOXELS // math.prod(plan.shape)))
    return (batch, channels, *plan.shape)


def probe_input(model: LoadedModel, network: nn.Module) -> torch.Tensor:
    """A reproducible probe of :func:`probe_shape`: uniform values in [0, 1] (the range of a
    windowed CT)."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(probe_shape(model, network), generator=generator)


# ------------------------------------------------------------------------------ checks
def check_equal_logits(
    model: LoadedModel, network: nn.Module, ort_network: OrtCpuNetwork, probe: torch.Tensor
) -> str:
    """The check in words when the onnxruntime logits match the PyTorch ones on ``probe``
    within the ONNX export's bound; MTKDError naming the model folder when they do not."""
    from mtkd.export.onnx import ONNX_RELATIVE_BOUND

    with torch.inference_mode():
        record = check_export(
            network,
            ort_network,
            probe,
            model.folder,
            ONNX_RELATIVE_BOUND,
            what="the onnxruntime network",
            sample_name=f"a {_shape_text(probe.shape)} probe",
        )
    return f"max logit difference {record['max_abs_diff']:.1e} (allowed {record['bound']:.1e})"


def time_backends(
    network: Callable[[torch.Tensor], Any],
    ort_network: Callable[[torch.Tensor], Any],
    probe: torch.Tensor,
    repeats: int = TIMING_REPEATS,
) -> tuple[float, float]:
    """Median seconds of a forward pass of ``probe`` under torch and under onnxruntime,
    ``repeats`` each, interleaved so that a change in the machine's load hits both (call after
    a warm-up pass of each)."""
    seconds: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, run in (("torch", network), ("onnxruntime", ort_network)):
                started = time.perf_counter()
                first_output(run(probe))
                seconds[name].append(time.perf_counter() - started)
    return statistics.median(seconds["torch"]), statistics.median(seconds["onnxruntime"])


def adopt_memory_estimate(ort_network: OrtCpuNetwork, network: nn.Module, model: LoadedModel):
    """Make :func:`mtkd.infer.memory.activation_bytes_per_voxel` give ``ort_network`` the
    PyTorch network's estimate (it cannot hook into onnxruntime), so that the predictor plans
    both alike: the same slice batches, whole volume or windows, hence the same labels."""
    prep = model.prep
    for amp in (True, False):
        settings = (int(prep.in_channels), int(prep.dims), int(model.size_multiple), "cpu", amp)
        measured = activation_bytes_per_voxel(network, *settings)
        record_activation_bytes(ort_network, *settings, measured)


def _shape_text(shape: tuple[int, ...] | torch.Size) -> str:
    return "x".join(str(int(s)) for s in shape)


# ------------------------------------------------------------------------------ selection
def onnxruntime_model(
    model: LoadedModel, cache_root: Path | None = None
) -> tuple[LoadedModel, dict[str, Any]]:
    """``model`` with its PyTorch network replaced by the cached ONNX export under
    onnxruntime on the CPU, checked on a probe input; and what was done (threads, probe,
    check, cache path, whether it was exported now). MTKDError naming the model folder when
    onnxruntime is missing, the model cannot be exported or the logits differ."""
    network = model.network
    refusal = refusal_of(model)
    if refusal:
        raise MTKDError(refusal, model.folder)
    network.to("cpu").eval()
    threads = configure_cpu_threads()
    try:
        entry = cached_onnx_export(model, network, cache_root)
        try:
            ort_network = OrtCpuNetwork(entry.path, threads)
        except MTKDError:  # whole on disk yet unloadable: export it once more
            remove_entry(entry.path.parent)
            entry = cached_onnx_export(model, network, cache_root)
            ort_network = OrtCpuNetwork(entry.path, threads)
        probe = probe_input(model, network)
        check = check_equal_logits(model, network, ort_network, probe)
    except MTKDError:
        raise
    except Exception as error:  # noqa: BLE001 - the file system, an exporter, onnxruntime
        raise MTKDError(
            f"the onnxruntime backend failed: {error_summary(error)}", model.folder
        ) from None
    adopt_memory_estimate(ort_network, network, model)
    record = {
        "threads": threads,
        "probe": probe,
        "check": check,
        "path": entry.path,
        "exported": entry.exported,
    }
    return dataclasses.replace(model, network=ort_network, has_taps=False), record


def network_for_backend(
    model: LoadedModel,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    *,
    cache_root: Path | None = None,
) -> tuple[LoadedModel, str]:
    """(the model to predict with, the backend used in words).

    - "torch": ``model`` unchanged.
    - "onnxruntime": its PyTorch network run by onnxruntime on the CPU
      (:func:`onnxruntime_model`); MTKDError naming the model folder when onnxruntime is
      missing, the network cannot be exported, its logits differ from torch's, or ``device``
      is not the CPU.
    - "auto": on the CPU, whichever of the two ran a probe forward pass faster (the
      description gives both times); torch, with the reason, when onnxruntime is refused or
      ``device`` is not the CPU.

    A model that is already TorchScript or ONNX runs as loaded under "auto", and under
    "onnxruntime" when it is ONNX.
    """
    if backend not in BACKENDS:
        raise MTKDError(f"unknown backend {backend!r}; choose torch, onnxruntime or auto")
    device = torch.device(device)
    network = model.network
    if not is_torch_network(network):
        if backend == "onnxruntime" and not isinstance(network, OnnxNetwork):
            raise MTKDError(refusal_of(model), model.folder)
        return model, f"{network_kind(network)}, run as loaded"
    if backend == "torch":
        return model, "torch"
    if device.type != "cpu":
        if backend == "onnxruntime":
            raise MTKDError(
                f"the onnxruntime backend runs on the CPU, not on {device}; choose device cpu "
                "or backend torch",
                model.folder,
            )
        return model, f"torch (auto: onnxruntime is for the CPU, this runs on {device})"
    try:
        candidate, record = onnxruntime_model(model, cache_root)
    except MTKDError as error:
        if backend == "onnxruntime":
            raise
        return model, f"torch (auto: onnxruntime refused: {error.problem})"
    how = _describe(record)
    if backend == "onnxruntime":
        return candidate, f"onnxruntime ({how})"
    torch_s, ort_s = time_backends(network, candidate.network, record["probe"])
    timing = f"onnxruntime {ort_s:.3g} s, torch {torch_s:.3g} s per forward pass"
    if ort_s < torch_s:
        return candidate, f"onnxruntime (auto: {timing}; {how})"
    return model, f"torch (auto: {timing}; {how})"


def _describe(record: dict[str, Any]) -> str:
    cached = "exported now" if record["exported"] else "cached"
    return (
        f"{record['threads']} threads, {_shape_text(record['probe'].shape)} probe, "
        f"{record['check']}, ONNX {cached} at {record['path']}"
    )
