"""Running a segmentation network over a preprocessed volume (1, X, Y, Z).

2-D networks see batches of axial slices; 3-D networks run on the whole volume (padded up to
their size multiple) or with MONAI's sliding windows, as an :class:`InferencePlan` says.
Networks may be ``nn.Module``, TorchScript, or plain callables (ONNX wrappers) returning a
tensor or a list/tuple whose first item is the segmentation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from mtkd.data.preprocess import Preprocessing
from mtkd.infer.memory import InferencePlan, round_up

Network = nn.Module | Callable[[torch.Tensor], Any]


def repeat_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, 1, *spatial) -> (B, channels, *spatial) by repeating the CT channel."""
    if images.shape[1] == channels:
        return images
    return images.expand(images.shape[0], channels, *images.shape[2:])


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 (fp16 where bf16 is unsupported) autocast on CUDA; a no-op context on the CPU."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def first_output(output: object) -> torch.Tensor:
    """Networks may return a tensor or a list/tuple (deep supervision): take the main output."""
    return output[0] if isinstance(output, (list, tuple)) else output


def logits_to_probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """(B, C, ...) logits -> probabilities: softmax over C, or sigmoid for one channel."""
    return torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)


def probabilities_to_labels(probabilities: torch.Tensor, activation: str) -> torch.Tensor:
    """(C, ...) probabilities -> (...) int64 label map (0 = background)."""
    if activation == "sigmoid":
        return (probabilities[0] > 0.5).long()
    return probabilities.argmax(dim=0)


def _probabilities_inplace(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """(B, C, ...) float32 logits -> probabilities, overwriting ``logits``."""
    if activation == "sigmoid":
        return logits.sigmoid_()
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


def set_eval(network: Network) -> None:
    if isinstance(network, nn.Module):
        network.eval()


def call_network(network: Network, batch: torch.Tensor) -> torch.Tensor:
    """(B, C_in, *spatial) -> logits (B, C, *spatial) on ``batch``'s device."""
    output = first_output(network(batch))
    if not isinstance(output, torch.Tensor):
        output = torch.as_tensor(output)
    return output.to(batch.device)


def _pad_to_multiple(x: torch.Tensor, multiple: int, axes: int) -> torch.Tensor:
    """Zero-pad the last ``axes`` sizes of ``x`` up to multiples of ``multiple`` (at the end)."""
    widths = [round_up(s, multiple) - s for s in x.shape[-axes:]]
    if not any(widths):
        return x
    return F.pad(x, [p for w in reversed(widths) for p in (0, w)])


def predict_slices(
    network: Network,
    volume: torch.Tensor,
    prep: Preprocessing,
    activation: str,
    device: torch.device,
    batch: int,
    amp: bool = True,
    size_multiple: int = 1,
    out_device: torch.device | None = None,
) -> torch.Tensor:
    """2-D network over the axial slices of ``volume`` (1, X, Y, Z), ``batch`` at a time.

    Returns probabilities (C, X, Y, Z) on ``out_device`` (default ``device``): a view of a
    (Z, C, X, Y) buffer.
    """
    out_device = device if out_device is None else out_device
    slices = volume.permute(3, 0, 1, 2)  # (Z, 1, X, Y)
    depth, _, width, height = slices.shape
    out = None
    for start in range(0, depth, batch):
        chunk = slices[start : start + batch].to(device)
        chunk = _pad_to_multiple(repeat_channels(chunk, prep.in_channels), size_multiple, 2)
        with autocast_for(device, amp):
            logits = call_network(network, chunk)
        probabilities = _probabilities_inplace(logits.float()[..., :width, :height], activation)
        if out is None:
            shape = (depth, probabilities.shape[1], width, height)
            out = torch.empty(shape, dtype=torch.float32, device=out_device)
        out[start : start + chunk.shape[0]] = probabilities
    return out.permute(1, 2, 3, 0)


def predict_whole(
    network: Network,
    volume: torch.Tensor,
    prep: Preprocessing,
    activation: str,
    device: torch.device,
    amp: bool = True,
    size_multiple: int = 1,
) -> torch.Tensor:
    """3-D network on the whole ``volume`` (1, X, Y, Z), zero-padded at the end up to
    multiples of ``size_multiple``; probabilities (C, X, Y, Z) on ``device``."""
    spatial = volume.shape[1:]
    x = repeat_channels(volume.to(device)[None], prep.in_channels)
    x = _pad_to_multiple(x, size_multiple, 3)
    with autocast_for(device, amp):
        logits = call_network(network, x)
    logits = logits.float()[..., : spatial[0], : spatial[1], : spatial[2]]
    return _probabilities_inplace(logits, activation)[0]


def predict_windows(
    network: Network,
    volume: torch.Tensor,
    prep: Preprocessing,
    activation: str,
    device: torch.device,
    batch: int,
    amp: bool = True,
    out_device: torch.device | None = None,
) -> torch.Tensor:
    """3-D network with MONAI sliding windows of ``prep.patch_size`` (overlap 0.25, gaussian
    weights), ``batch`` windows per pass; probabilities (C, X, Y, Z) on ``out_device``."""
    out_device = device if out_device is None else out_device
    inputs = repeat_channels(volume.to(device)[None], prep.in_channels)

    def run(window: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, amp):
            return call_network(network, window).float()

    logits = sliding_window_inference(
        inputs,
        roi_size=prep.patch_size,
        sw_batch_size=batch,
        predictor=run,
        overlap=0.25,
        mode="gaussian",
        sw_device=device,
        device=out_device,
    )
    return _probabilities_inplace(torch.as_tensor(logits).float(), activation)[0]


def predict_planned(
    network: Network,
    volume: torch.Tensor,
    prep: Preprocessing,
    activation: str,
    device: torch.device,
    plan: InferencePlan,
    amp: bool = True,
    size_multiple: int = 1,
    out_device: torch.device | None = None,
) -> torch.Tensor:
    """Probabilities (C, X, Y, Z) of a preprocessed ``volume`` (1, X, Y, Z) run as ``plan``
    says (call under ``torch.inference_mode``)."""
    set_eval(network)
    if plan.mode == "slices":
        return predict_slices(
            network, volume, prep, activation, device, plan.batch, amp, size_multiple, out_device
        )
    if plan.mode == "whole":
        return predict_whole(network, volume, prep, activation, device, amp, size_multiple)
    return predict_windows(network, volume, prep, activation, device, plan.batch, amp, out_device)


def predict_volume(
    network: Network,
    image: torch.Tensor,
    prep: Preprocessing,
    activation: str,
    device: torch.device,
    slice_batch: int = 16,
    window_batch: int = 4,
    amp: bool = True,
) -> torch.Tensor:
    """Probabilities (C, X, Y, Z) of a preprocessed image (1, X, Y, Z), on the CPU.

    2-D: ``slice_batch`` slices per pass; 3-D: the whole volume when it is no larger than
    a patch, else sliding windows (``window_batch`` per pass).
    """
    set_eval(network)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        if prep.dims == 2:
            out = predict_slices(
                network, image, prep, activation, device, slice_batch, amp, out_device=cpu
            )
        elif all(s <= p for s, p in zip(image.shape[1:], prep.patch_size, strict=True)):
            out = predict_whole(network, image, prep, activation, device, amp).to(cpu)
        else:
            out = predict_windows(
                network, image, prep, activation, device, window_batch, amp, out_device=cpu
            )
        return out.contiguous()
