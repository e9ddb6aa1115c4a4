"""Running a segmentation network over a preprocessed volume (1, X, Y, Z).

2-D networks see batches of axial slices; 3-D networks run on the whole volume (padded up to
their size multiple) or with MONAI's sliding windows, as an :class:`InferencePlan` says.
:func:`predict_in_slabs` does the same in parts along z, computing the network input of each
part on demand and giving the probabilities part by part, so that neither the whole input nor
the whole probability volume needs to exist (except for a whole-volume pass, which the plan
only picks when the network's activations for the whole volume fit the budget).
Networks may be ``nn.Module``, TorchScript, or plain callables (ONNX wrappers) returning a
tensor or a list/tuple whose first item is the segmentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from mtkd.data.preprocess import Preprocessing
from mtkd.devices import autocast_for
from mtkd.infer.memory import InferencePlan, round_up
from mtkd.infer.stages import stage

Network = nn.Module | Callable[[torch.Tensor], Any]
# (z0, z1) -> network input (1, X, Y, z1 - z0) of the model grid's z slices [z0, z1)
SlabInput = Callable[[int, int], torch.Tensor]
# MONAI sliding-window settings of every 3-D window pass
WINDOW_OVERLAP = 0.25
WINDOW_BLEND = "gaussian"
# the ``activation`` of the predict functions that keeps the network's logits (C, X, Y, Z)
KEEP_LOGITS = "logits"


def repeat_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, 1, *spatial) -> (B, channels, *spatial) by repeating the CT channel."""
    if images.shape[1] == channels:
        return images
    return images.expand(images.shape[0], channels, *images.shape[2:])


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
    """(B, C, ...) float32 logits -> probabilities, overwriting ``logits`` (``activation``
    :data:`KEEP_LOGITS`: the logits as they are)."""
    if activation == KEEP_LOGITS:
        return logits
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
        with stage("host to device"):
            chunk = slices[start : start + batch].to(device)
        chunk = _pad_to_multiple(repeat_channels(chunk, prep.in_channels), size_multiple, 2)
        with stage("network"), autocast_for(device, amp):
            logits = call_network(network, chunk)
        with stage("softmax"):
            probabilities = logits.float()[..., :width, :height]
            probabilities = _probabilities_inplace(probabilities, activation)
        with stage("probability copy"):
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
    with stage("host to device"):
        x = repeat_channels(volume.to(device)[None], prep.in_channels)
        x = _pad_to_multiple(x, size_multiple, 3)
    with stage("network"), autocast_for(device, amp):
        logits = call_network(network, x)
    with stage("softmax"):
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
        with stage("network"), autocast_for(device, amp):
            return call_network(network, window).float()

    with stage("sliding-window stitching"):
        logits = sliding_window_inference(
            inputs,
            roi_size=prep.patch_size,
            sw_batch_size=batch,
            predictor=run,
            overlap=WINDOW_OVERLAP,
            mode=WINDOW_BLEND,
            sw_device=device,
            device=out_device,
        )
    with stage("softmax"):
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


def window_interval(window: int, overlap: float = WINDOW_OVERLAP) -> int:
    """MONAI's scan interval between sliding windows ``window`` voxels long."""
    return max(int(window * (1 - overlap)), 1)


def window_starts(size: int, window: int, overlap: float = WINDOW_OVERLAP) -> list[int]:
    """Start of each of MONAI's sliding windows along one axis of ``size`` voxels (every
    scan interval, the last window flush with the end)."""
    if window >= size:
        return [0]
    interval = window_interval(window, overlap)
    count = next(d for d in range(size) if d * interval + window >= size) + 1
    return [min(d * interval, size - window) for d in range(count)]


def window_tiles(
    size: int, window: int, rows_per_tile: int, overlap: float = WINDOW_OVERLAP
) -> list[tuple[int, int, int, int]]:
    """Split sliding windows along z into tiles: (input start, input stop, keep start, keep
    stop) per tile, consecutive keep ranges covering [0, size).

    Windows with the same z start form a row; tile ``t`` ends with row ``b_t`` (``rows_per_tile``
    more than the last tile's) and keeps the slices from the previous tile's kept end to the start
    of row ``b_t + 1``. Its input spans every row that covers a kept slice, so MONAI's sliding
    window over the tile's input places exactly those rows' windows there (the scan interval
    puts them on the same positions) and sums, for each kept voxel, the same windows in the same
    order as one pass over the whole volume.
    """
    starts = window_starts(size, window, overlap)
    last = len(starts) - 1
    tiles, kept = [], 0
    for end_row in range(rows_per_tile - 1, last + rows_per_tile, max(rows_per_tile, 1)):
        end_row = min(end_row, last)
        stop = starts[end_row + 1] if end_row < last else size
        first_row = next(r for r in range(last + 1) if starts[r] + window > kept)
        tiles.append((starts[first_row], starts[end_row] + window, kept, stop))
        kept = stop
    return tiles


def predict_in_slabs(
    network: Network,
    model_input: SlabInput,
    shape: tuple[int, int, int],
    prep: Preprocessing,
    activation: str,
    device: torch.device,
    plan: InferencePlan,
    amp: bool = True,
    size_multiple: int = 1,
    out_device: torch.device | None = None,
    channels: int = 1,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Probabilities of a model grid of ``shape`` (X, Y, Z) run as ``plan`` says, in
    consecutive slabs along z: yields (z0, probabilities (C, X, Y, z1 - z0)) on
    ``out_device`` (default ``device``) from z0 = 0 to Z. ``model_input(z0, z1)`` gives the
    network input of each slab when it is needed (call under ``torch.inference_mode``).

    - "slices": ``plan.batch`` slices per slab, as :func:`predict_slices`;
    - "whole": one slab, the whole volume, as :func:`predict_whole`;
    - "sliding": tiles of window rows (:func:`window_tiles`) of about ``plan.slab_bytes`` of
      input and stitched output (``channels`` + 2 float32 per voxel), each run by
      :func:`predict_windows`: the same probabilities as one pass over the whole volume.
    """
    set_eval(network)
    out_device = device if out_device is None else out_device
    depth = shape[2]
    if plan.mode == "slices":
        for z0 in range(0, depth, plan.batch):
            z1 = min(z0 + plan.batch, depth)
            inputs = model_input(z0, z1)
            slices = predict_slices(
                network, inputs, prep, activation, device, z1 - z0, amp, size_multiple, out_device
            )
            yield z0, slices
    elif plan.mode == "whole":
        inputs = model_input(0, depth)
        whole = predict_whole(network, inputs, prep, activation, device, amp, size_multiple)
        del inputs  # not kept while the probabilities are mapped back
        yield 0, whole.to(out_device)
    else:
        window = int(prep.patch_size[2])
        row_bytes = 4 * (channels + 2) * math.prod(shape[:2]) * window_interval(window)
        rows = max(1, plan.slab_bytes // max(row_bytes, 1))
        for start, stop, keep_start, keep_stop in window_tiles(depth, window, rows):
            inputs = model_input(start, stop)
            tile = predict_windows(
                network, inputs, prep, activation, device, plan.batch, amp, out_device
            )
            yield keep_start, tile[..., keep_start - start : keep_stop - start]


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
    """Probabilities (C, X, Y, Z) of a preprocessed image (1, X, Y, Z), on the CPU (the
    logits with ``activation`` :data:`KEEP_LOGITS`).

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
