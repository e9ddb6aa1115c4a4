"""Installing the engine's dependencies from inside the Slicer application.

Only this file touches the application (its dialogs, ``slicer.util.pip_install``); what to
install, how (``slicer.packaging.pip_ensure`` on Slicer 5.12 and later, PyTorchUtils for
torch) and every decision is in :mod:`MTKDLib.dependencies`, tested headless through the same
:class:`~MTKDLib.dependencies.Installer`.
"""

from __future__ import annotations

import slicer

from MTKDLib import dependencies

TITLE = "MTKD"


def slicer_installer() -> dependencies.Installer:
    """The :class:`~MTKDLib.dependencies.Installer` of this Slicer: its dialogs and
    installers."""

    def pip_install(arguments: list[str]) -> None:
        with slicer.util.WaitCursor():
            slicer.util.pip_install(arguments)

    return dependencies.Installer(
        confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle=TITLE),
        inform=lambda text: slicer.util.infoDisplay(text, windowTitle=TITLE),
        error=lambda text: slicer.util.errorDisplay(text, windowTitle=TITLE),
        pip_install=pip_install,
        pip_ensure=dependencies.find_pip_ensure(),
        install_torch=dependencies.find_install_torch(),
    )


def ensure_engine_dependencies() -> bool:
    """True when torch and every engine requirement are installed (after asking the user to
    install what is missing); False, with a message saying why, otherwise."""
    return dependencies.ensure_engine_dependencies(slicer_installer())


def ensure_optional(extra: str) -> bool:
    """Install the optional ``extra`` on first use ("onnx": onnxruntime, before running an
    ONNX model; "bundle": jsonschema, before a MONAI bundle check); True when it is there,
    False after telling the user why not."""
    return dependencies.ensure_optional(extra, slicer_installer())


def ensure_model_extras(*sources) -> bool:
    """Install on first use what running the models at ``sources`` needs beyond the engine
    (onnxruntime for ONNX models); True when it is all there."""
    return dependencies.ensure_model_extras(sources, slicer_installer())
