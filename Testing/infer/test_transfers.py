"""Host and device copies (``mtkd.infer.transfers``): on the CPU nothing is copied; the
pinned, non-blocking CUDA path runs in ``Testing/engine/test_gpu.py``."""

from __future__ import annotations

import numpy as np
import torch

from mtkd.infer.transfers import to_device, to_host


def test_on_the_cpu_the_tensors_are_the_host_memory():
    voxels = np.arange(24, dtype=np.int16).reshape(2, 3, 4).transpose(2, 1, 0)  # a view
    host = torch.from_numpy(voxels)
    assert to_device(host, torch.device("cpu")).data_ptr() == host.data_ptr()
    labels = torch.zeros((4, 3, 2), dtype=torch.uint8).permute(2, 1, 0)  # (X, Y, Z) of (Z, Y, X)
    array = to_host(labels)
    assert isinstance(array, np.ndarray) and array.shape == (2, 3, 4)
    array[1, 2, 3] = 7  # the same memory, the same strides: ready for to_sitk's transpose
    assert labels[1, 2, 3] == 7 and array.transpose(2, 1, 0).flags.c_contiguous
    assert to_host(array) is array
