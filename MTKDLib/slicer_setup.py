"""Installing the engine's dependencies from inside the Slicer application.

Only callable in the application (dialogs, the PyTorch extension's PyTorchUtils); what to
install and how is decided in :mod:`MTKDLib.dependencies`, which is tested headless.
Uses ``slicer.packaging`` (Slicer 5.12 and later) and falls back to ``slicer.util.pip_install``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import slicer

from MTKDLib.dependencies import (
    confirmation_text,
    failure_text,
    missing_requirements,
    pip_arguments,
    protected_constraints,
    read_requirements,
    requirement_class,
)

PYTORCH_MISSING = (
    "MTKD runs its models with PyTorch, which comes from Slicer's PyTorch extension.\n"
    "Install 'PyTorch' from the Extension Manager (View > Extension Manager), restart Slicer, "
    "then try again."
)


def ensure_torch() -> bool:
    """torch through PyTorchUtils (it picks the CUDA build for this GPU and driver)."""
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(PYTORCH_MISSING, windowTitle="MTKD")
        return False
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if logic.torchInstalled():
        return True
    try:
        torch = logic.installTorch(askConfirmation=True)
    except Exception as error:  # noqa: BLE001 - shown to the user
        slicer.util.errorDisplay(failure_text(["torch"], str(error)), windowTitle="MTKD")
        return False
    return torch is not None


def _write_constraints() -> Path:
    with tempfile.NamedTemporaryFile(
        "w", prefix="mtkd-constraints-", suffix=".txt", delete=False
    ) as handle:
        handle.write(protected_constraints())
    return Path(handle.name)


def _install(missing: list[str], constraints: Path) -> bool:
    """pip install under the constraints, after the user confirmed; False if declined."""
    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.12+
        requirement = requirement_class()  # it asks, installs with progress, offers restart
        requirements = [requirement(text) for text in missing]
        packaging.pip_ensure(requirements, constraints=str(constraints), requester="MTKD")
        return True
    if not slicer.util.confirmOkCancelDisplay(confirmation_text(missing), windowTitle="MTKD"):
        return False
    with slicer.util.WaitCursor():
        slicer.util.pip_install(pip_arguments(missing, constraints))
    return True


def ensure_engine_dependencies() -> bool:
    """True when torch and every engine requirement are installed (after asking the user to
    install what is missing); False, with a message saying what failed, otherwise."""
    if not ensure_torch():
        return False
    missing = missing_requirements(read_requirements())
    if not missing:
        return True
    constraints = _write_constraints()
    try:
        if not _install(missing, constraints):
            return False
    except Exception as error:  # noqa: BLE001 - pip's failure, shown with how to retry
        slicer.util.errorDisplay(failure_text(missing, str(error)), windowTitle="MTKD")
        return False
    finally:
        constraints.unlink(missing_ok=True)
    still_missing = missing_requirements(read_requirements())
    if still_missing:
        slicer.util.errorDisplay(
            failure_text(still_missing, "pip finished but these are still missing."),
            windowTitle="MTKD",
        )
        return False
    return True
