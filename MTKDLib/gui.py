"""Qt glue shared by the MTKD modules' widgets (application only; the logic is elsewhere).

- :class:`ModuleWidget`: the parameter-node and scene plumbing of Slicer's scripted-module
  template, once for both modules.
- :class:`TaskView`: follows an :class:`~MTKDLib.process.EngineTask` from a ``QTimer`` on the
  main thread and shows it in a start/cancel button, a progress bar and a status label.
- The model library, in the folder kept in Slicer's settings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from MTKDLib.process import EngineTask

LIBRARY_SETTING = "MTKD/ModelLibrary"
POLL_MILLISECONDS = 250


def library_root() -> Path:
    """The model library folder from the user's settings (default: the engine's default,
    so that Slicer and ``mtkd library`` share one library)."""
    from mtkd.library import default_library_root

    value = qt.QSettings().value(LIBRARY_SETTING)
    return Path(value) if value else default_library_root()


def set_library_root(path: str | Path) -> None:
    qt.QSettings().setValue(LIBRARY_SETTING, str(path))


def model_library(root: str | Path | None = None):
    """The model library in ``root`` (default: the folder in the user's settings)."""
    from mtkd.library import ModelLibrary

    return ModelLibrary(root or library_root())


class ModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Base of the MTKD module widgets: loads ``Resources/UI/<module>.ui``, keeps the module's
    parameter node connected to the widgets, and follows the scene being closed.

    Subclasses set ``self.logic`` before calling :meth:`setupModule` and implement
    :meth:`updateGui`; :meth:`onParameterNode` and :meth:`stopWork` are hooks.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setupModule(self, uiName: str, buttons: dict[str, Callable[[], None]]) -> None:
        """Load the ``.ui``, connect ``buttons`` ({widget name: slot}) and the scene."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{uiName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for name, slot in buttons.items():
            getattr(self.ui, name).connect("clicked(bool)", lambda _checked, s=slot: s())
        scene = slicer.mrmlScene
        self.addObserver(scene, scene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(scene, scene.EndCloseEvent, self.onSceneEndClose)

    def stopWork(self) -> None:
        """Hook: stop following running work (the scene closes or the module is cleaned up)."""

    def onParameterNode(self) -> None:
        """Hook: the parameter node was (re)connected; fill in defaults."""

    def updateGui(self, caller=None, event=None) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        self.stopWork()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.stopWork()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.onParameterNode()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
            self.updateGui()


class TaskView:
    """One running task at a time, shown in ``button`` (its text turns to "Cancel"),
    ``progress`` and ``status``. ``on_success(result)`` runs on the main thread."""

    def __init__(self, button: Any, progress: Any, status: Any):
        self.button, self.progress, self.status = button, progress, status
        self.task: EngineTask | None = None
        self._idle_text = button.text
        self._on_success: Callable[[Any], None] | None = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.timeout.connect(self._poll)

    @property
    def running(self) -> bool:
        return self.task is not None

    def start(self, make_task: Callable[[], EngineTask], on_success: Callable[[Any], None]):
        """Start the task ``make_task()`` builds; errors building it are shown, not raised."""
        try:
            self.task = make_task()
        except Exception as error:  # noqa: BLE001 - bad input: say what is wrong
            slicer.util.errorDisplay(str(error), windowTitle="MTKD")
            return
        self._on_success = on_success
        self._idle_text = self.button.text
        self.button.text = "Cancel"
        self.progress.value = 0
        self.progress.visible = True
        self.status.text = "starting..."
        self._timer.start()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self._finish("Cancelled; the scene is as it was.")

    def _poll(self) -> None:
        state = self.task.poll()
        self.progress.value = int(round(100 * state.fraction))
        self.status.text = state.stage
        if not state.finished:
            return
        result = self.task.result
        if state.succeeded:
            self._finish("Done.")
            try:
                self._on_success(result)
            except Exception as error:  # noqa: BLE001 - shown to the user
                slicer.util.errorDisplay(f"Showing the result failed: {error}", windowTitle="MTKD")
        else:
            message = state.error or "the MTKD process failed"
            self._finish(f"Failed: {message.splitlines()[0]}")
            slicer.util.errorDisplay(message, windowTitle="MTKD")

    def _finish(self, text: str) -> None:
        self._timer.stop()
        self.task = None
        self.button.text = self._idle_text
        self.progress.visible = False
        self.status.text = text
