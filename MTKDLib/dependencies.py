"""The Python packages the engine needs inside Slicer, and installing them safely (no Qt).

``requirements.txt`` beside this file is the one list (kept equal to the engine's
``pyproject.toml`` by a test): the engine's dependencies less Slicer's own numpy and
SimpleITK, then the optional extras the GUI offers, marked as in package metadata
(``onnxruntime>=1.18,<2; extra == "onnx"``).

- torch comes from Slicer's PyTorch extension: PyTorchUtils is given the version requirement
  of ``requirements.txt`` (it picks the build for the GPU and driver). The installed version is
  read from package metadata; torch is never imported into Slicer's process to check it.
- The others are installed with pip after the user confirms (``slicer.packaging.pip_ensure``
  on Slicer 5.12 and later, else ``slicer.util.pip_install``), under a constraints file that
  pins Slicer's own numpy, SimpleITK and VTK (and the installed torch) to their current
  versions, so that pip fails rather than replace any of them.
- The extras (:data:`EXTRAS`) are installed the same way on first use (:func:`ensure_optional`).

What the application provides (dialogs, installers) is passed in as an :class:`Installer`
(``MTKDLib.slicer_setup`` builds Slicer's), so every decision here runs in the tests.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from MTKDLib.process import EngineTask

REQUIREMENTS_FILE = Path(__file__).with_name("requirements.txt")
TORCH = "torch"
# Slicer's own packages (and the PyTorch extension's torch): never replaced by our install
PROTECTED = ("numpy", "SimpleITK", "vtk", "torch")
# the optional extras the GUI offers: extra name -> what needs it (said in messages)
EXTRAS = {
    "onnx": "Running ONNX models",
    "bundle": "Checking MONAI bundles",
}
REQUESTER = "MTKD"
VersionOf = Callable[[str], "str | None"]
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([A-Za-z0-9_.-]+)["']""")


def requirement_class() -> Any:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # Slicer always has pip, which vendors packaging
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def _lines(path: str | Path) -> list[str]:
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def extra_of(text: str) -> str | None:
    """The extra a requirement line belongs to (``...; extra == "onnx"`` -> ``onnx``)."""
    _, _, marker = text.partition(";")
    found = _EXTRA_MARKER.search(marker)
    return found.group(1) if found else None


def read_requirements(path: str | Path = REQUIREMENTS_FILE) -> list[str]:
    """The engine's requirement lines (torch included; comments, blank lines and the optional
    extras' lines left out)."""
    return [line for line in _lines(path) if extra_of(line) is None]


def optional_requirements(extra: str, path: str | Path = REQUIREMENTS_FILE) -> list[str]:
    """The requirement lines of the optional ``extra`` (its marker removed); ValueError for
    an extra the GUI does not offer."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown optional extra '{extra}': one of {', '.join(EXTRAS)}")
    return [line.split(";", 1)[0].strip() for line in _lines(path) if extra_of(line) == extra]


def package_names(requirements: Sequence[str]) -> list[str]:
    """The distribution names of requirement lines (``monai>=1.4,<1.7`` -> ``monai``)."""
    return [re.split(r"[\s<>=!~;\[]", text, maxsplit=1)[0] for text in requirements]


def torch_requirement(requirements: Sequence[str] | None = None) -> str:
    """The torch line of the requirements (``torch>=2.2,<3``)."""
    for text in read_requirements() if requirements is None else requirements:
        if package_names([text])[0].lower() == TORCH:
            return text
    raise ValueError(f"{REQUIREMENTS_FILE}: no torch requirement")


def torch_version_requirement(requirements: Sequence[str] | None = None) -> str:
    """The version part of the torch requirement (``>=2.2,<3``), as PyTorchUtils'
    ``installTorch(torchVersionRequirement=...)`` takes it (it appends it to ``torch``)."""
    text = torch_requirement(requirements).split(";", 1)[0].strip()
    return text[len(TORCH) :].strip()


def pip_requirements(requirements: Sequence[str] | None = None) -> list[str]:
    """The requirements pip installs: all but torch (which PyTorchUtils installs)."""
    lines = read_requirements() if requirements is None else requirements
    return [text for text in lines if package_names([text])[0].lower() != TORCH]


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` from its package metadata (the package is
    not imported), or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def fresh_installed_version(distribution: str) -> str | None:
    """:func:`installed_version` after an install (the import system's caches cleared)."""
    importlib.invalidate_caches()
    return installed_version(distribution)


def missing_requirements(
    requirements: Sequence[str], version_of: VersionOf = installed_version
) -> list[str]:
    """The requirements that are not installed or whose installed version does not fit."""
    make_requirement = requirement_class()
    missing = []
    for text in requirements:
        requirement = make_requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        version = version_of(requirement.name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def _fits(requirement: str, version: str) -> bool:
    return not missing_requirements([requirement], lambda _: version)


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


def manual_install_text(missing: Sequence[str], version_of: VersionOf = installed_version) -> str:
    """How to install ``missing`` by hand, Slicer's own packages pinned to what they are."""
    pins = [f"{name}=={version}" for name in PROTECTED if (version := version_of(name)) is not None]
    words = [*missing, *pins]
    console = " ".join(words)
    terminal = " ".join(f'"{word}"' for word in words)
    return (
        "in Slicer's Python console (View > Python Console):\n"
        f"  slicer.util.pip_install('{console}')\n"
        "or in a terminal, in Slicer's bin folder:\n"
        f"  PythonSlicer -m pip install {terminal}"
    )


def confirmation_text(missing: Sequence[str], purpose: str = "MTKD") -> str:
    """What the confirmation dialog says before anything is installed."""
    listed = "\n".join(f"  - {text}" for text in missing)
    kept = ", ".join(name for name in PROTECTED if name != TORCH)
    return (
        f"{purpose} needs these Python packages, which are not installed yet:\n"
        f"{listed}\n\n"
        f"They will be installed into Slicer's Python with pip (internet access is needed). "
        f"Slicer's own {kept} and the installed PyTorch are kept as they are.\n\n"
        "Install now?"
    )


def declined_text(
    missing: Sequence[str], purpose: str = "MTKD", version_of: VersionOf = installed_version
) -> str:
    """What the user is told after declining: nothing was installed, and how to later."""
    names = " ".join(package_names(missing))
    return (
        f"Nothing was installed. {purpose} needs {names}, so it cannot run until they are "
        "installed.\n\n"
        "To install them later, press the same button again and accept, or install them "
        f"{manual_install_text(missing, version_of)}"
    )


def torch_declined_text(requirement: str) -> str:
    """After the user declined installing PyTorch."""
    return (
        "Nothing was installed. MTKD runs its models with PyTorch, so it cannot run until "
        "PyTorch is installed.\n\n"
        "To install it later, press the same button again and accept, or open the module "
        f"'PyTorch Utils', set the torch version requirement to {requirement} and press "
        "Install."
    )


def torch_mismatch_text(installed: str, requirement: str) -> str:
    """The question asked when an installed torch does not fit the requirement."""
    return (
        f"PyTorch {installed} is installed, but MTKD needs torch{requirement}.\n\n"
        "Install a fitting PyTorch with the PyTorch extension now? Other extensions that use "
        "PyTorch will use the new version too; restart Slicer afterwards if one of them has "
        "already loaded PyTorch."
    )


def failure_text(
    missing: Sequence[str], error: str, version_of: VersionOf = installed_version
) -> str:
    """What failed and how to retry."""
    names = " ".join(package_names(missing))
    return (
        f"Installing {names} failed:\n{error.strip()}\n\n"
        "Nothing of Slicer's own packages was changed. To retry: check the internet connection "
        "(and proxy settings), then press the same button again or use 'Check environment'. "
        f"To install by hand, {manual_install_text(missing, version_of)}\n"
        "The Python console (View > Python Console) shows pip's full log."
    )


PYTORCH_MISSING = (
    "MTKD runs its models with PyTorch, which comes from Slicer's PyTorch extension.\n"
    "Install 'PyTorch' from the Extension Manager (View > Extension Manager), restart Slicer, "
    "then try again."
)


@dataclass
class Installer:
    """What installing needs from the application, injected (``slicer_setup`` gives Slicer's).

    - ``confirm(text) -> bool``, ``inform(text)``, ``error(text)``: dialogs.
    - ``pip_ensure``: ``slicer.packaging.pip_ensure`` (Slicer 5.12 and later; it asks the
      user itself and raises RuntimeError when declined), or None.
    - ``pip_install(arguments)``: ``slicer.util.pip_install`` (a list of ``pip install``
      arguments), used when ``pip_ensure`` is None, after :attr:`confirm`.
    - ``install_torch(version_requirement, ask) -> module or None``: PyTorchUtils'
      ``installTorch`` (None when the user declined its question), or None when the PyTorch
      extension is not installed.
    """

    confirm: Callable[[str], bool]
    inform: Callable[[str], None]
    error: Callable[[str], None]
    pip_install: Callable[[list[str]], Any]
    pip_ensure: Callable[..., Any] | None = None
    install_torch: Callable[[str, bool], Any] | None = None
    version_of: VersionOf = installed_version
    fresh_version_of: VersionOf = fresh_installed_version


def find_pip_ensure(
    package: str = "slicer", import_module: Callable[[str], Any] = importlib.import_module
) -> Callable[..., Any] | None:
    """``<package>.packaging.pip_ensure`` (Slicer 5.12 and later), imported explicitly:
    ``slicer/__init__.py`` does not import ``slicer.packaging``, so it is no attribute of
    ``slicer`` until imported. None when this Slicer has no ``slicer.packaging``."""
    try:
        packaging = import_module(f"{package}.packaging")
    except ImportError:
        return None
    return getattr(packaging, "pip_ensure", None)


def find_install_torch(
    import_module: Callable[[str], Any] = importlib.import_module,
) -> Callable[[str, bool], Any] | None:
    """PyTorchUtils' ``installTorch`` as ``install(version_requirement, ask)``; None when the
    PyTorch extension is not installed."""
    try:
        pytorch_utils = import_module("PyTorchUtils")
    except ImportError:
        return None

    def install(version_requirement: str, ask: bool) -> Any:
        logic = pytorch_utils.PyTorchUtilsLogic()
        return logic.installTorch(askConfirmation=ask, torchVersionRequirement=version_requirement)

    return install


def ensure_torch(installer: Installer, requirements: Sequence[str] | None = None) -> bool:
    """True when a torch that fits the requirement is installed (after installing it through
    PyTorchUtils when the user agrees); False, with a message saying why, otherwise."""
    requirement = torch_version_requirement(requirements)
    installed = installer.version_of(TORCH)
    if installed is not None and _fits(TORCH + requirement, installed):
        return True
    if installer.install_torch is None:
        installer.error(PYTORCH_MISSING)
        return False
    ask = True
    if installed is not None:  # installed, but a version that does not fit: explain first
        if not installer.confirm(torch_mismatch_text(installed, requirement)):
            installer.inform(torch_declined_text(requirement))
            return False
        ask = False
    try:
        result = installer.install_torch(requirement, ask)
    except Exception as error:  # noqa: BLE001 - shown to the user
        installer.error(failure_text([TORCH + requirement], str(error), installer.version_of))
        return False
    if result is None:
        installer.inform(torch_declined_text(requirement))
        return False
    now = installer.fresh_version_of(TORCH)
    if now is None or not _fits(TORCH + requirement, now):
        installer.error(
            failure_text(
                [TORCH + requirement],
                f"PyTorch {now or 'nothing'} is installed after installing.",
                installer.version_of,
            )
        )
        return False
    return True


def _write_constraints(version_of: VersionOf) -> Path:
    with tempfile.NamedTemporaryFile(
        "w", prefix="mtkd-constraints-", suffix=".txt", delete=False, encoding="utf-8"
    ) as handle:
        handle.write(protected_constraints(version_of))
    return Path(handle.name)


def install_missing(installer: Installer, requirements: Sequence[str], purpose: str) -> bool:
    """Install the ``requirements`` not yet satisfied, after the user confirms, under the
    constraints that keep Slicer's own packages. True when all are satisfied afterwards;
    False (the user told why: declined, failed) otherwise."""
    missing = missing_requirements(requirements, installer.version_of)
    if not missing:
        return True
    constraints = _write_constraints(installer.version_of)
    try:
        if installer.pip_ensure is not None:  # Slicer 5.12+: asks, installs with progress
            try:
                installer.pip_ensure(missing, constraints=str(constraints), requester=REQUESTER)
            except RuntimeError as error:
                if "declined" not in str(error).lower():
                    raise
                installer.inform(declined_text(missing, purpose, installer.version_of))
                return False
        else:
            if not installer.confirm(confirmation_text(missing, purpose)):
                installer.inform(declined_text(missing, purpose, installer.version_of))
                return False
            installer.pip_install(pip_arguments(missing, constraints))
    except Exception as error:  # noqa: BLE001 - pip's failure, shown with how to retry
        installer.error(failure_text(missing, str(error), installer.version_of))
        return False
    finally:
        with contextlib.suppress(OSError):
            constraints.unlink()
    still_missing = missing_requirements(requirements, installer.fresh_version_of)
    if still_missing:
        installer.error(
            failure_text(
                still_missing, "pip finished but these are still missing.", installer.version_of
            )
        )
        return False
    return True


def ensure_engine_dependencies(
    installer: Installer, requirements: Sequence[str] | None = None
) -> bool:
    """True when torch and every engine requirement are installed (after asking the user to
    install what is missing); False, with a message saying why, otherwise."""
    requirements = read_requirements() if requirements is None else list(requirements)
    if not ensure_torch(installer, requirements):
        return False
    return install_missing(installer, pip_requirements(requirements), "MTKD")


def ensure_optional(
    extra: str, installer: Installer, requirements: Sequence[str] | None = None
) -> bool:
    """Install the optional ``extra`` (see :data:`EXTRAS`: "onnx" before running an ONNX
    model, "bundle" before a MONAI bundle check) on first use; True when it is there."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown optional extra '{extra}': one of {', '.join(EXTRAS)}")
    needed = optional_requirements(extra) if requirements is None else list(requirements)
    return install_missing(installer, needed, EXTRAS[extra])


def extras_for_model(source: str | Path) -> list[str]:
    """The optional extras that running the model at ``source`` needs: ``["onnx"]`` for an
    ``.onnx`` file or a folder holding ``model.onnx`` (an ONNX export or its library entry),
    else none. Reads names only: nothing is loaded."""
    path = Path(source)
    if path.suffix.lower() == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file()):
        return ["onnx"]
    return []


def ensure_model_extras(sources: Sequence[str | Path], installer: Installer) -> bool:
    """:func:`ensure_optional` for every extra that the models at ``sources`` need (empty
    sources are skipped); True when all of them are there."""
    extras = dict.fromkeys(
        extra for source in sources if source for extra in extras_for_model(source)
    )
    return all(ensure_optional(extra, installer) for extra in extras)


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
