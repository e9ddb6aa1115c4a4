"""The devices a model can run on, as the Slicer modules offer them (no Qt, no torch).

Which GPUs PyTorch sees is asked of the engine's own interpreter in a child process
(``mtkd env --json``, its ``devices`` list), never by importing torch into Slicer's process;
the answer is cached per interpreter.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from typing import Any

from mtkd.devices import check_device_name, is_device_name
from MTKDLib.process import engine_command, engine_environment, engine_python, popen_keywords

# Always offered, also when torch is missing or the engine cannot be asked
DEFAULT_DEVICES = ("auto", "cpu")
_cache: dict[str, list[str]] = {}


def check_device(device: str) -> str:
    """``device`` when it is a device name the engine accepts ("auto", "cpu", "cuda",
    "cuda:N", "mps": the engine's rule, :mod:`mtkd.devices`); MTKDError (a ValueError)
    naming the accepted forms otherwise."""
    return check_device_name(device)


def devices_from_report(report: dict[str, Any]) -> list[str]:
    """The device names of an environment report (``mtkd env --json``): "auto", "cpu",
    then each other device it lists; DEFAULT_DEVICES when it lists none."""
    listed = report.get("devices") or []
    names = list(DEFAULT_DEVICES)
    for name in listed:
        if is_device_name(name) and name not in names:
            names.append(name)
    return names


def available_devices(
    python: str | None = None,
    env: dict[str, str] | None = None,
    refresh: bool = False,
    timeout: float = 120.0,
) -> list[str]:
    """["auto", "cpu", "cuda:0", ..., "mps" where PyTorch has it] for the engine interpreter
    ``python`` (default: :func:`~MTKDLib.process.engine_python`).

    Asked once per interpreter in a child process (blocks for as long as it takes torch to
    load there, a few seconds; ``refresh`` asks again, e.g. after PyTorch was installed).
    When the engine cannot be asked (torch or the engine missing, an error, a timeout) the
    answer is DEFAULT_DEVICES, without an error, and is not cached.
    """
    python = python or engine_python()
    if not refresh and python in _cache:
        return list(_cache[python])
    report = _environment_report(engine_command(["env", "--json"], python), env, timeout)
    if report is None:
        return list(DEFAULT_DEVICES)
    _cache[python] = devices_from_report(report)
    return list(_cache[python])


NOT_FOUND = "{device} (not found on this computer)"


def device_items(devices: Sequence[str], selected: str) -> list[tuple[str, str]]:
    """(shown text, device) of each item of a device combo box: every device of
    ``devices``, and ``selected`` when it is not one of them (e.g. ``cuda:1`` in a scene made
    on another computer), marked, so that the box shows what will be used."""
    items = [(device, device) for device in devices]
    if selected and selected not in devices:
        items.append((NOT_FOUND.format(device=selected), selected))
    return items


def _environment_report(
    command: Sequence[str], env: dict[str, str] | None, timeout: float
) -> dict[str, Any] | None:
    try:
        result = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            stdin=subprocess.DEVNULL,
            env=env or engine_environment(),
            timeout=timeout,
            **popen_keywords(),
        )
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return None
    start = result.stdout.find("{")
    if result.returncode != 0 or start < 0:
        return None
    try:
        report = json.loads(result.stdout[start:])
    except json.JSONDecodeError:
        return None
    return report if isinstance(report, dict) else None
