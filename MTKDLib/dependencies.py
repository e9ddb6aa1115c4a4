"""The Python packages the engine needs inside Slicer, and installing them safely (no Qt).

torch comes from Slicer's PyTorch extension (PyTorchUtils picks the build for the GPU and
driver). The other engine requirements (``requirements.txt`` beside this file, kept equal to
the engine's ``pyproject.toml`` by a test) are installed with pip after the user confirms,
under a constraints file that pins Slicer's own numpy, SimpleITK and VTK (and the installed
torch) to their current versions, so that pip fails rather than replace any of them.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from MTKDLib.process import EngineTask

REQUIREMENTS_FILE = Path(__file__).with_name("requirements.txt")
# Slicer's own packages (and the PyTorch extension's torch): never replaced by our install
PROTECTED = ("numpy", "SimpleITK", "vtk", "torch")
VersionOf = Callable[[str], "str | None"]


def requirement_class() -> Any:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # Slicer always has pip, which vendors packaging
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def read_requirements(path: str | Path = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(
    requirements: Sequence[str], version_of: VersionOf = installed_version
) -> list[str]:
    """The requirements that are not installed or whose installed version does not fit."""
    make_requirement = requirement_class()
    missing = []
    for text in requirements:
        requirement = make_requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = version_of(requirement.name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def protected_constraints(version_of: VersionOf = installed_version) -> str:
    """pip constraints pinning each installed protected package to its current version."""
    lines = ["# MTKD: keep Slicer's own packages exactly as they are"]
    for name in PROTECTED:
        version = version_of(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def pip_arguments(missing: Sequence[str], constraints_file: str | Path) -> list[str]:
    """Arguments of ``pip install`` for the missing requirements under the constraints."""
    return [*missing, "--constraint", str(constraints_file)]


def package_names(requirements: Sequence[str]) -> list[str]:
    """The distribution names of requirement lines (``monai>=1.4,<1.7`` -> ``monai``)."""
    return [re.split(r"[\s<>=!~;\[]", text, maxsplit=1)[0] for text in requirements]


def confirmation_text(missing: Sequence[str]) -> str:
    """What the confirmation dialog says before anything is installed."""
    listed = "\n".join(f"  - {text}" for text in missing)
    kept = ", ".join(name for name in PROTECTED if name != "torch")
    return (
        "MTKD needs these Python packages, which are not installed yet:\n"
        f"{listed}\n\n"
        f"They will be installed into Slicer's Python with pip (internet access is needed). "
        f"Slicer's own {kept} and the installed PyTorch are kept as they are.\n\n"
        "Install now?"
    )


def failure_text(missing: Sequence[str], error: str) -> str:
    """What failed and how to retry."""
    names = " ".join(package_names(missing))
    return (
        f"Installing {names} failed:\n{error.strip()}\n\n"
        "Nothing of Slicer's own packages was changed. To retry: check the internet connection "
        "(and proxy settings), then press Apply again or use 'Check environment'. "
        "To install by hand, run in a terminal:\n"
        f"  PythonSlicer -m pip install {' '.join(repr(text) for text in missing)}\n"
        "The Python console (View > Python Console) shows pip's full log."
    )


def environment_task(python: str | None = None, env: dict[str, str] | None = None) -> EngineTask:
    """A background ``mtkd env --json`` (torch and CUDA are looked at in the engine's own
    process, never imported into Slicer's GUI); its result is the report as a dict."""
    holder: dict[str, EngineTask] = {}

    def collect(_workdir: Path) -> dict[str, Any]:
        text = "\n".join(holder["task"].process.tail(1000))
        start = text.find("{")
        if start < 0:
            raise ValueError(f"no environment report in the output:\n{text}")
        return json.loads(text[start:])

    task = EngineTask(lambda _workdir: ["env", "--json"], collect, python=python, env=env)
    holder["task"] = task
    return task
