"""Qt glue shared by the MTKD modules' widgets (application only; the logic is elsewhere).

- :class:`ModuleWidget`: the parameter-node and scene plumbing of Slicer's scripted-module
  template, once for both modules.
- :class:`TaskView`: follows an :class:`~MTKDLib.process.EngineTask` from a ``QTimer`` on the
  main thread and shows it in a start/cancel button, a progress bar and a status label.
- :class:`DeviceChoice`: a combo box of the devices this machine has, found off the GUI thread.
- The model library, in the folder kept in Slicer's settings.
- For the self-tests: :func:`process_events_until` (wait without blocking Slicer),
  :func:`choose_item` (pick a combo box item as a user does), :func:`demo_scene` (the demo's
  models in a scratch library, the bundled CT in the scene) and
  :func:`missing_engine_packages` (whether the heavy part can run).

Nothing here waits on the GUI thread: Cancel and closing the scene only ask processes to stop
(:meth:`~MTKDLib.process.EngineTask.cancel` returns at once and kills the tree later).
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from MTKDLib.devices import DEFAULT_DEVICES, available_devices, device_items
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
        """Cancel the running task; returns at once (the process is asked to stop and killed
        later if it does not, without the GUI waiting for it)."""
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


class DeviceChoice:
    """A device combo box (``auto``, ``cpu``, ``cuda:0``, ``cuda:1``, ..., ``mps``) for a
    parameter node's ``device`` string: :meth:`show` selects the node's value, a choice by the
    user is passed to ``write``.

    The devices come from :func:`MTKDLib.devices.available_devices`, which asks the engine's
    interpreter in a child process (seconds while torch loads there); :meth:`detect` asks in a
    thread and a timer fills the box when the answer is there, so the panel never waits.
    Until then the box offers ``auto`` and ``cpu``.
    """

    def __init__(self, comboBox: Any, write: Callable[[str], None]):
        self.comboBox = comboBox
        self._write = write
        self._devices = list(DEFAULT_DEVICES)
        self._found: list[str] | None = None
        self._thread: threading.Thread | None = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.timeout.connect(self._collect)
        comboBox.connect("currentIndexChanged(int)", self._onChosen)
        self.show(DEFAULT_DEVICES[0])

    @property
    def devices(self) -> list[str]:
        return list(self._devices)

    def detect(self, refresh: bool = False) -> None:
        """Ask for the devices (again with ``refresh``, e.g. after PyTorch was installed)."""
        if self._thread is not None and self._thread.is_alive():
            return

        def work() -> None:
            try:
                self._found = available_devices(refresh=refresh)
            except Exception:  # noqa: BLE001 - the defaults stay offered
                self._found = None

        self._thread = threading.Thread(target=work, name="MTKD devices", daemon=True)
        self._thread.start()
        self._timer.start()

    def _collect(self) -> None:
        if self._thread is None or self._thread.is_alive():
            return
        self._timer.stop()
        self._devices = self._found or list(DEFAULT_DEVICES)
        self.show(self.selected())

    def selected(self) -> str:
        return self.comboBox.currentData or DEFAULT_DEVICES[0]

    def show(self, device: str) -> None:
        """List the devices and select ``device`` (without calling ``write``)."""
        comboBox = self.comboBox
        items = device_items(self._devices, device)
        wasBlocked = comboBox.blockSignals(True)
        try:
            shown = [(comboBox.itemText(i), comboBox.itemData(i)) for i in range(comboBox.count)]
            if shown != items:
                comboBox.clear()
                for text, name in items:
                    comboBox.addItem(text, name)
            comboBox.currentIndex = max(comboBox.findData(device), 0)
        finally:
            comboBox.blockSignals(wasBlocked)

    def _onChosen(self, index: int) -> None:
        device = self.comboBox.itemData(index)
        if device:
            self._write(device)


# ------------------------------------------------------------------------ self-tests
ENGINE_PACKAGES = ("torch", "monai")


def missing_engine_packages() -> list[str]:
    """Those of torch and MONAI that the engine's interpreter cannot import. Found with
    ``importlib.util.find_spec``, which imports nothing (PythonSlicer, the engine's
    interpreter, shares Slicer's site-packages, so Slicer's view is the engine's)."""
    return [name for name in ENGINE_PACKAGES if importlib.util.find_spec(name) is None]


def process_events_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Keep Slicer responsive (``slicer.app.processEvents``) until ``condition()`` holds;
    TimeoutError naming ``what`` after ``timeout`` seconds. For the self-tests and scripts:
    the timers that follow the background processes keep running meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout:.0f} s")
        slicer.app.processEvents()
        time.sleep(0.05)


def _quick_demo_in_scratch_folder(test: str, message: Callable[[str], None]) -> Path | None:
    """For the self-tests' end-to-end part: a new scratch folder in which ``mtkd demo --quick``
    has trained the demo's teacher and students (``FOLDER/demo``), run in the background while
    Slicer stays responsive. None, after ``message`` (e.g. ``delayDisplay``) says that ``test``
    did not run and why, when torch or MONAI is not installed."""
    import tempfile

    missing = missing_engine_packages()
    if missing:
        message(
            f"{test} not run: {', '.join(missing)} not installed in Slicer's Python "
            "(MTKD Segment > Environment > Install dependencies installs them)"
        )
        return None
    work = Path(tempfile.mkdtemp(prefix="mtkd-selftest-"))
    message("Training a tiny teacher and students on the bundled CT (mtkd demo --quick)")
    demo = EngineTask(lambda _: ["demo", "--quick", "--output", str(work / "demo")], lambda _: None)
    process_events_until(lambda: demo.poll().finished, 1800, "mtkd demo --quick")
    if not demo.state.succeeded:
        raise AssertionError(f"mtkd demo --quick failed: {demo.state.error}")
    return work


@dataclass
class DemoScene:
    """What :func:`demo_scene` set up: the scratch folder (``mtkd demo --quick``'s output in
    ``work/demo``), the library entries imported from it by folder name, and the bundled CT
    loaded into the scene."""

    work: Path
    models: dict[str, Any]
    volume: Any  # vtkMRMLScalarVolumeNode


@contextlib.contextmanager
def demo_scene(
    logic: Any,
    test: str,
    message: Callable[[str], None],
    models: list[str],
    refresh: Callable[[], None],
) -> Iterator[DemoScene | None]:
    """For the self-tests' end-to-end part: the demo trained in a scratch folder, ``logic``'s
    model library moved there with the demo's ``models`` (folders of ``work/demo``) imported,
    and the bundled CT loaded. After the block the user's library is back and ``refresh``
    (the panel's library refresh) runs. Yields None, after ``message`` says why ``test`` did
    not run, when torch or MONAI is not installed."""
    work = _quick_demo_in_scratch_folder(test, message)
    if work is None:
        yield None
        return
    from mtkd.demo import bundled_sample

    logic.libraryRoot = work / "library"
    try:
        imported = {name: logic.library().import_model(work / "demo" / name) for name in models}
        volume = slicer.util.loadVolume(str(bundled_sample()[0]))
        yield DemoScene(work=work, models=imported, volume=volume)
    finally:
        logic.libraryRoot = None
        refresh()


def choose_item(comboBox: Any, data: str) -> None:
    """Select the item of ``comboBox`` whose data is ``data``, as a user picking it does
    (the box's signals fire); AssertionError when the box does not offer it."""
    index = comboBox.findData(data)
    if index < 0:
        raise AssertionError(f"{comboBox.objectName} does not offer '{data}'")
    comboBox.currentIndex = index
