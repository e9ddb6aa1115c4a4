"""Copies between the host and a CUDA device through pinned (page-locked) memory.

A copy from ordinary host memory makes the driver stage it through a pinned buffer of its own
and blocks the host until it is done. Pinned first, the copy runs as a DMA transfer queued on
the current stream (``non_blocking``): the host goes on reading and converting the image's next
block while the GPU still resamples or runs the network on this one. PyTorch's caching host
allocator keeps a pinned block until the copies queued from it have run, so the host tensor
may be dropped at once. On the CPU nothing is copied.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_device", "to_host"]


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The CPU tensor ``host`` (any shape and strides, e.g. a view of an image's buffer) on
    ``device``: ``host`` itself on the CPU; on CUDA a copy queued without blocking the host."""
    if device.type != "cuda":
        return host.to(device)
    # one host copy into pinned memory: with the same strides where ``host`` is dense (a
    # permuted view of an image), else contiguous (a crop), so that the DMA is one block
    pinned = torch.empty_like(host, device="cpu", pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


def to_host(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """A label map as a NumPy array with the same strides (a view for CPU tensors); from CUDA
    through pinned memory, waiting for the copy to finish."""
    if isinstance(labels, np.ndarray):
        return labels
    if labels.device.type != "cuda":
        return labels.numpy()
    host = torch.empty_like(labels, device="cpu", pin_memory=True)
    host.copy_(labels, non_blocking=True)
    torch.cuda.current_stream(labels.device).synchronize()
    return host.numpy()
