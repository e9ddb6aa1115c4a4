"""Memory and CPU budgets of inference: free memory, activation size, the inference plan.

``plan_inference`` picks whole-volume inference when the network's activations for the whole
(padded) volume fit the budget, sliding windows otherwise (the window batch chosen from the
budget), and slice batches for 2-D networks. ``PeakMemory`` measures what a run used.

**The memory bound of one segmentation** (``Predictor.predict``, whose plan follows the
budget ``memory_budget_bytes``, else half the free memory). The volume is preprocessed,
predicted and mapped back onto the input grid in slabs along z (:mod:`mtkd.infer.model_input`,
:func:`mtkd.infer.inference.predict_in_slabs`): no full-resolution float copy of the image and
no (C, X, Y, Z) probability volume on the input grid is ever made. At its peak a segmentation
holds, above the process's own baseline (``PROCESS_BASELINE_BYTES``: Python, torch, MONAI,
SimpleITK and a small model),

- the input image as the caller holds it (2 bytes per voxel for int16, 4 for float32),
- the label map twice, briefly (1 byte per voxel each, 2 above 255 labels: the array and the
  SimpleITK image made from it),
- the network's activations as planned (``InferencePlan.activation_bytes``, at most the
  budget; with a whole-volume pass this includes its input and output), and
- ``SLAB_BUFFERS`` slabs of ``plan.slab_bytes`` (budget / 16, between 4 and 64 MiB); only a
  sliding-window tile may be larger: it holds at least one row of windows and their output,
  4 (C + 2) X Y (P_z + interval) bytes for a model grid of X x Y slices, C channels and
  windows P_z deep.

:func:`segmentation_memory_bound` adds these up: peak RSS <= baseline + image bytes +
2 x voxels + activations + 4 x 64 MiB. For a 512 x 512 x 1200 int16 CT (315 M voxels),
which ``mtkd segment`` keeps as int16: 0.5 + 0.59 + 0.59 + 0.25 = 1.9 GiB plus the
activations (0.06 GiB for a small 2-D U-Net on 64 x 64 slices, 0.37 GiB for a small 3-D U-Net
on the whole volume at 4 mm); a float32 CT adds 0.59 GiB.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mtkd.data.preprocess import Preprocessing

# Activation bytes per input voxel assumed when a network cannot be probed (TorchScript, ONNX):
# about what a 3-D U-Net with 32 base filters needs in float32, so on the safe side.
FALLBACK_BYTES_PER_VOXEL = 4096.0
MAX_WINDOW_BATCH = 64
MAX_SLICE_BATCH = 256
# On the CPU, slice batches whose activations outgrow the caches run slower (measured: a 2-D
# U-Net on 256x256 slices ran 2-4x faster in batches of ~64 MiB of activations than of 1 GiB).
CPU_SLICE_BATCH_BYTES = 64 << 20
# Slab sizes (bytes of float32 per slab) for preprocessing, sliding-window tiles and the inverse
# mapping: a sixteenth of the budget within these bounds. 64 MiB slabs run as fast as larger
# ones (each pass still streams through memory in long runs).
MIN_SLAB_BYTES = 4 << 20
MAX_SLAB_BYTES = 64 << 20
# Resident memory of an ``mtkd`` process with torch, MONAI and SimpleITK imported and a small
# model loaded, before it reads an image (0.44 GiB measured on the CPU machine).
PROCESS_BASELINE_BYTES = 512 << 20
# Slab-sized buffers alive at once at most (preprocessing and the inverse mapping each hold a
# few: the block read, the interpolation's two gathers, its output, the labels).
SLAB_BUFFERS = 4
# cgroup memory limits at or above this mean "no limit" (v1 writes 2**63 rounded to pages).
_NO_LIMIT = 1 << 60

_probe_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_probe_cache_by_id: dict[int, dict] = {}


# ------------------------------------------------------------------------------ memory
def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def meminfo_available(text: str) -> int | None:
    """Bytes of ``MemAvailable`` in the text of /proc/meminfo, or None."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            return int(parts[1]) * 1024
    return None


def cgroup_memory_room(limit_text: str | None, usage_text: str | None) -> int | None:
    """Bytes left under a cgroup memory limit (v2 memory.max / v1 memory.limit_in_bytes and
    the matching usage file), or None when there is no limit."""
    if limit_text is None or usage_text is None:
        return None
    limit = limit_text.strip()
    if limit in ("", "max"):
        return None
    try:
        limit_bytes, usage = int(limit), int(usage_text.strip())
    except ValueError:
        return None
    if limit_bytes >= _NO_LIMIT:
        return None
    return max(limit_bytes - usage, 0)


def free_memory_bytes(device: torch.device | str) -> int:
    """Bytes free for inference on ``device``: CUDA free memory; on the CPU MemAvailable,
    capped by the room left under a cgroup (v2 or v1) memory limit."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = meminfo_available(_read("/proc/meminfo") or "")
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = 4 << 30
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        room = cgroup_memory_room(_read(limit), _read(usage))
        if room is not None:
            available = min(available, room)
    return int(available)


# ------------------------------------------------------------------------------ threads
def cpu_max_quota(text: str | None) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` text ("max 100000" -> None, "200000 100000"
    -> 2.0), or None when there is no quota or the text is not understood."""
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cfs_quota(quota_text: str | None, period_text: str | None) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none)."""
    if not quota_text or not period_text:
        return None
    return cpu_max_quota(f"{quota_text.strip()} {period_text.strip()}")


def usable_cpus(affinity: int, quota: float | None) -> int:
    """CPUs this process may keep busy: its affinity set, capped by a CPU quota (rounded
    down, at least 1)."""
    if quota is None:
        return max(1, affinity)
    return max(1, min(affinity, math.floor(quota)))


def configure_cpu_threads() -> int:
    """Set torch's intra-op threads to the CPUs this process may use, unless the user chose
    (OMP_NUM_THREADS or MKL_NUM_THREADS set); returns torch's thread count."""
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    quota = cpu_max_quota(_read("/sys/fs/cgroup/cpu.max"))
    if quota is None:
        quota = cfs_quota(
            _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
            _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
        )
    threads = usable_cpus(affinity, quota)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------------------ estimate
def _probe_side(size_multiple: int) -> int:
    """A probe size per axis: two multiples of the network's, and at least 16."""
    multiple = max(1, int(size_multiple))
    return multiple * max(2, math.ceil(16 / multiple))


def activation_bytes_per_voxel(
    network: object,
    in_channels: int,
    dims: int,
    size_multiple: int,
    device: torch.device | str,
    amp: bool = True,
) -> float:
    """Bytes of layer outputs per input voxel (pixel for 2-D networks) in one forward pass.

    Measured once per network object with forward hooks on the leaf modules (the sum of the
    bytes of every output) over a probe input of ``2 * size_multiple`` (at least 16) per axis;
    a conservative constant for networks without hooks (TorchScript, ONNX wrappers).
    """
    key = _estimate_key(in_channels, dims, size_multiple, device, amp)
    cache = _estimates_of(network)
    if key not in cache:
        cache[key] = _probe(network, in_channels, dims, size_multiple, torch.device(device), amp)
    return cache[key]


def record_activation_bytes(
    network: object,
    in_channels: int,
    dims: int,
    size_multiple: int,
    device: torch.device | str,
    amp: bool,
    bytes_per_voxel: float,
) -> None:
    """Let :func:`activation_bytes_per_voxel` give ``bytes_per_voxel`` for ``network`` with
    these settings: for a network the hooks cannot measure (e.g. an ONNX Runtime session)
    that runs the graph of a measured PyTorch network, so that both get the same plan."""
    key = _estimate_key(in_channels, dims, size_multiple, device, amp)
    _estimates_of(network)[key] = float(bytes_per_voxel)


def _estimate_key(in_channels, dims, size_multiple, device, amp) -> tuple:
    return (int(in_channels), int(dims), int(size_multiple), torch.device(device).type, bool(amp))


def _estimates_of(network: object) -> dict:
    """The estimates kept for ``network`` (by weak reference, else by id)."""
    try:
        return _probe_cache.setdefault(network, {})
    except TypeError:  # not weak-referenceable
        return _probe_cache_by_id.setdefault(id(network), {})


def _probe(network, in_channels, dims, size_multiple, device, amp) -> float:
    if not isinstance(network, nn.Module) or isinstance(network, torch.jit.ScriptModule):
        return FALLBACK_BYTES_PER_VOXEL
    leaves = [m for m in network.modules() if next(m.children(), None) is None]
    if not leaves:
        return FALLBACK_BYTES_PER_VOXEL
    from mtkd.devices import autocast_for

    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        stack = [output]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())

    side = _probe_side(size_multiple)
    probe = torch.zeros((1, in_channels, *([side] * dims)), device=device)
    handles = [leaf.register_forward_hook(count) for leaf in leaves]
    training = network.training
    network.eval()  # inference-time activations; batch-norm statistics stay untouched
    try:
        with torch.inference_mode(), autocast_for(device, amp):
            network(probe)
    except Exception:  # noqa: BLE001 - a network that refuses the probe gets the fallback
        return FALLBACK_BYTES_PER_VOXEL
    finally:
        for handle in handles:
            handle.remove()
        network.train(training)
    total += probe.numel() * probe.element_size()
    return max(total / side**dims, 1.0)


# ------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class InferencePlan:
    """How a volume runs: ``mode`` "whole", "sliding" or "slices".

    ``shape`` is the network input (B, C, *spatial) for "whole" (padded to the size
    multiple), the window (X, Y, Z) for "sliding", the slice (X, Y) for "slices"; ``batch``
    is windows or slices per forward pass.
    """

    mode: str
    shape: tuple[int, ...]
    batch: int
    bytes_per_voxel: float
    budget_bytes: int
    slab_bytes: int = MAX_SLAB_BYTES

    def activation_bytes(self) -> int:
        """Estimated bytes of the network's activations in one forward pass of this plan."""
        voxels = math.prod(self.shape[-3:]) if self.mode != "slices" else math.prod(self.shape)
        batch = 1 if self.mode == "whole" else self.batch
        return int(self.bytes_per_voxel * voxels * batch)

    def describe(self) -> str:
        size = "x".join(str(s) for s in self.shape)
        if self.mode == "whole":
            return f"whole volume {size}"
        if self.mode == "sliding":
            return f"sliding window {size}, {self.batch} windows per batch"
        return f"2-D slices {size}, {self.batch} slices per batch"


def slab_bytes_for(budget_bytes: int) -> int:
    """Bytes of float32 per slab for a memory budget: budget / 16, within 4..64 MiB."""
    return int(min(max(int(budget_bytes) // 16, MIN_SLAB_BYTES), MAX_SLAB_BYTES))


def segmentation_memory_bound(
    image_bytes: int, voxels: int, plan: InferencePlan, label_bytes_per_voxel: int = 1
) -> int:
    """Bytes one segmentation holds at its peak above the process's baseline (see the module
    docstring): the image (``image_bytes``), the label map twice (``voxels`` of
    ``label_bytes_per_voxel``), the network's activations and ``SLAB_BUFFERS`` slabs."""
    labels = 2 * voxels * label_bytes_per_voxel
    return int(image_bytes + labels + plan.activation_bytes() + SLAB_BUFFERS * plan.slab_bytes)


def round_up(size: int, multiple: int) -> int:
    multiple = max(1, int(multiple))
    return -(-int(size) // multiple) * multiple


def plan_inference(
    volume_shape: tuple[int, ...],
    prep: Preprocessing,
    bytes_per_voxel: float,
    budget_bytes: int,
    size_multiple: int = 1,
    slice_batch_bytes: int | None = None,
    extent_dependent: bool = False,
) -> InferencePlan:
    """Plan a preprocessed volume (X, Y, Z) for a network needing ``bytes_per_voxel``.

    2-D: batch = clamp(min(budget, slice_batch_bytes) // (bytes_per_voxel * X * Y), 1, 256)
    slices, and at most Z. 3-D: the whole volume (each size padded up to ``size_multiple``)
    when bytes_per_voxel * its voxels fits the budget and the network's output does not depend
    on its input's extent (``extent_dependent``: instance or group normalisation, whose
    statistics would then cover the whole volume instead of a training patch), else windows of
    ``prep.patch_size``, batch = clamp(budget // (bytes_per_voxel * window voxels), 1, 64).
    """
    spatial = tuple(int(s) for s in volume_shape[-3:])
    budget = int(budget_bytes)
    slabs = slab_bytes_for(budget)
    if prep.dims == 2:
        pixels = spatial[0] * spatial[1]
        limit = budget if slice_batch_bytes is None else min(budget, int(slice_batch_bytes))
        batch = int(limit // (bytes_per_voxel * pixels))
        batch = min(max(batch, 1), MAX_SLICE_BATCH, max(spatial[2], 1))
        return InferencePlan("slices", spatial[:2], batch, bytes_per_voxel, budget, slabs)
    padded = tuple(round_up(s, size_multiple) for s in spatial)
    if not extent_dependent and bytes_per_voxel * math.prod(padded) <= budget:
        shape = (1, prep.in_channels, *padded)
        return InferencePlan("whole", shape, 1, bytes_per_voxel, budget, slabs)
    window = tuple(int(s) for s in prep.patch_size)
    batch = int(budget // (bytes_per_voxel * math.prod(window)))
    batch = min(max(batch, 1), MAX_WINDOW_BATCH)
    return InferencePlan("sliding", window, batch, bytes_per_voxel, budget, slabs)


_EXTENT_DEPENDENT_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm)


def has_extent_dependent_norm(network: object, spec: dict | None = None) -> bool:
    """True when ``network`` normalises with statistics over the spatial extent of its input
    (instance or group norm): its output then changes with the window it is given.

    TorchScript modules are read by their original class names; other callables (ONNX) by
    their network ``spec`` (rebuilt on the ``meta`` device, no memory); without one they count
    as extent dependent and run on windows of their patch size, as they were trained.
    """
    names = {cls.__name__ for cls in _EXTENT_DEPENDENT_NORMS}
    if isinstance(network, torch.jit.ScriptModule):
        return any(getattr(m, "original_name", "") in names for m in network.modules())
    if isinstance(network, nn.Module):
        return any(isinstance(m, _EXTENT_DEPENDENT_NORMS) for m in network.modules())
    if spec:
        from mtkd.modelfiles.model_io import build_from_spec

        with torch.device("meta"):
            return has_extent_dependent_norm(build_from_spec(spec))
    return True


# ------------------------------------------------------------------------------ peak
def _resident_bytes() -> int:
    text = _read("/proc/self/statm")
    if not text:
        return 0
    return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` -> ``peak.peak_bytes``: the most memory the
    block used above what was in use at entry (CUDA: allocated tensors; CPU: resident memory
    sampled every ~2 ms by a daemon thread)."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._start = 0
        self._highest = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._highest = _resident_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._highest = max(self._highest, _resident_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(torch.cuda.max_memory_allocated(self.device) - self._start, 0)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._highest = max(self._highest, _resident_bytes())
        self.peak_bytes = max(self._highest - self._start, 0)
