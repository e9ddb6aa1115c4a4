"""Running a segmentation network over a preprocessed volume.

2-D networks see batches of axial slices; 3-D networks run whole-volume when the volume is
no larger than a patch and sliding-window (MONAI) otherwise.
"""

from __future__ import annotations

import contextlib

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from mtkd.data.preprocess import Preprocessing


def repeat_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, 1, *spatial) -> (B, channels, *spatial) by repeating the CT channel."""
    if images.shape[1] == channels:
        return images
    return images.expand(images.shape[0], channels, *images.shape[2:])


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 (or fp16) autocast on CUDA; a no-op context on the CPU."""
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


@torch.no_grad()
def predict_volume(
    network: nn.Module,
    image: torch.Tensor,
    prep: Preprocessing,
    activation: str,
    device: torch.device,
    slice_batch: int = 16,
    window_batch: int = 4,
    amp: bool = True,
) -> torch.Tensor:
    """Probabilities (C, X, Y, Z) of a preprocessed image (1, X, Y, Z), on the CPU."""
    network.eval()
    image = image.to(device)
    if prep.dims == 2:
        slices = image.permute(3, 0, 1, 2)  # (Z, 1, X, Y)
        outputs = []
        for start in range(0, slices.shape[0], slice_batch):
            batch = repeat_channels(slices[start : start + slice_batch], prep.in_channels)
            with autocast_for(device, amp):
                logits = first_output(network(batch))
            outputs.append(logits_to_probabilities(logits.float(), activation).cpu())
        return torch.cat(outputs).permute(1, 2, 3, 0).contiguous()
    volume = repeat_channels(image[None], prep.in_channels)

    def run(window: torch.Tensor) -> torch.Tensor:
        return first_output(network(window)).float()

    with autocast_for(device, amp):
        if all(s <= p for s, p in zip(volume.shape[2:], prep.patch_size, strict=True)):
            logits = run(volume)
        else:
            logits = sliding_window_inference(
                volume,
                roi_size=prep.patch_size,
                sw_batch_size=window_batch,
                predictor=run,
                overlap=0.25,
                mode="gaussian",
            )
    return logits_to_probabilities(logits.float(), activation)[0].cpu()
