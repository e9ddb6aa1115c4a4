"""What mtkd runs on: Python and package versions, CUDA and its GPUs, CPUs and free memory.

``environment_report`` gathers it as a JSON-ready dict (``mtkd env --json``, bug reports, the
Slicer module's about box); ``format_environment`` writes it for people.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Any

import mtkd

# (report key, distribution name, module name) of the packages whose versions are reported
PACKAGES = (
    ("torch", "torch", "torch"),
    ("monai", "monai", "monai"),
    ("simpleitk", "SimpleITK", "SimpleITK"),
    ("onnxruntime", "onnxruntime", "onnxruntime"),
)


def package_version(distribution: str, module: str) -> str | None:
    """The installed version of a package, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # installed without distribution metadata (e.g. bundled with an application)
        if importlib.util.find_spec(module) is None:
            return None
        version = getattr(importlib.import_module(module), "__version__", None)
    except Exception:  # noqa: BLE001 - a package that fails to import is not usable
        return None
    return str(version) if version is not None else None


def _gpus() -> list[dict[str, Any]]:
    """Name, total and free memory of each CUDA device (free is None if it cannot be read)."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        try:
            free, _ = torch.cuda.mem_get_info(index)
            free = int(free)
        except RuntimeError:
            free = None
        gpus.append(
            {
                "index": index,
                "name": properties.name,
                "total_memory_bytes": int(properties.total_memory),
                "free_memory_bytes": free,
            }
        )
    return gpus


def device_names() -> list[str]:
    """The ``--device`` values this machine can run: "auto", "cpu", each GPU ("cuda:0",
    "cuda:1", ...) and "mps" where PyTorch has Apple's GPU; ["auto", "cpu"] without torch."""
    try:
        import torch
    except ImportError:
        return ["auto", "cpu"]
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _total_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def environment_report(device: str | None = None) -> dict[str, Any]:
    """Versions, CUDA, GPUs, CPUs and memory, as a JSON-ready dict.

    ``device`` (default "auto": CUDA when available, else the CPU) is the device whose free
    memory is reported as ``device_free_memory_bytes``; MTKDError if it is not available.
    ``devices`` lists the device names this machine offers (:func:`device_names`).
    Without torch (e.g. in Slicer before its PyTorch extension is installed) the report says
    so (``torch`` is None) instead of failing.
    """
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "mtkd": mtkd.__version__,
    }
    for key, distribution, module in PACKAGES:
        report[key] = package_version(distribution, module)
    report.update(
        cpu_count=os.cpu_count() or 1,
        usable_cpus=_usable_cpus(),
        total_memory_bytes=_total_memory_bytes(),
    )
    try:
        import torch
    except ImportError:
        unknown = ("torch", "cuda_version", "torch_threads", "free_memory_bytes", "device")
        report.update(dict.fromkeys(unknown), device_free_memory_bytes=None)
        report.update(cuda_available=False, gpus=[], devices=device_names())
        return report

    from mtkd.devices import resolve_device
    from mtkd.infer.memory import free_memory_bytes

    chosen = resolve_device(str(device) if device is not None else "auto")
    report.update(
        torch=torch.__version__,
        cuda_available=torch.cuda.is_available(),
        cuda_version=torch.version.cuda,
        gpus=_gpus(),
        devices=device_names(),
        torch_threads=torch.get_num_threads(),
        free_memory_bytes=free_memory_bytes("cpu"),
        device=str(chosen),
        device_free_memory_bytes=free_memory_bytes(chosen),
    )
    return report


def _gib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / (1 << 30):.1f} GiB"


def format_environment(report: dict[str, Any]) -> str:
    """``report`` (from :func:`environment_report`) as lines of text."""
    versions = ", ".join(
        f"{name} {report.get(key) or 'not installed'}"
        for key, name in (
            ("monai", "MONAI"),
            ("simpleitk", "SimpleITK"),
            ("onnxruntime", "ONNX Runtime"),
        )
    )
    if report.get("cuda_available"):
        cuda = f"CUDA {report.get('cuda_version')} available"
    elif report.get("cuda_version"):
        cuda = f"built for CUDA {report['cuda_version']}, but no usable GPU"
    else:
        cuda = "CPU-only build (no CUDA)"
    lines = [
        f"mtkd {report.get('mtkd')} on Python {report.get('python')} ({report.get('platform')})",
        f"torch {report.get('torch')}: {cuda}"
        if report.get("torch")
        else "torch: not installed (in Slicer: install the PyTorch extension)",
        versions,
        f"CPUs: {report.get('cpu_count')} ({report.get('usable_cpus')} usable, torch uses "
        f"{report.get('torch_threads')} threads)",
        f"memory: {_gib(report.get('free_memory_bytes'))} free of "
        f"{_gib(report.get('total_memory_bytes'))}",
    ]
    for gpu in report.get("gpus") or []:
        lines.append(
            f"GPU {gpu.get('index')}: {gpu.get('name')}, {_gib(gpu.get('free_memory_bytes'))} "
            f"free of {_gib(gpu.get('total_memory_bytes'))}"
        )
    lines.append(
        f"device: {report.get('device')} ({_gib(report.get('device_free_memory_bytes'))} free)"
    )
    if report.get("devices"):
        lines.append(f"devices: {', '.join(report['devices'])}")
    return "\n".join(lines)
