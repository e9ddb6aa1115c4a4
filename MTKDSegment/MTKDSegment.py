"""MTKDSegment: run a distilled student on a loaded CT and compare it with its teacher.

The widget is a thin layer: the work is done by ``MTKDLib`` (no Qt; tested against real MRML
with ``slicer-core``), which runs the ``mtkd`` engine in a background process: one long-lived
worker for the session (``mtkd serve``, started on the first Apply or Compare, keeping the
models it loaded), stopped when the module is cleaned up, as Slicer does when it quits.
"""

import tempfile
from pathlib import Path

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

from MTKDLib.compare_logic import CompareLogic
from MTKDLib.gui import (
    DeviceChoice,
    ModuleWidget,
    TaskView,
    choose_item,
    demo_scene,
    library_root,
    model_library,
    process_events_until,
    set_library_root,
)
from MTKDLib.segment_logic import SegmentLogic
from MTKDLib.slicer_setup import ensure_engine_dependencies, ensure_model_extras
from MTKDLib.worker import shared_worker, stop_shared_worker

OTHER_TEACHER = "other"  # teacher combo box item: a path outside the library


class MTKDSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MTKD Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MTKD contributors"]
        self.parent.helpText = _(
            "Segment a CT with a small, fast student model distilled by MTKD, and compare it "
            "with its teacher (our run, a MONAI bundle, TorchScript, or a segmentation already "
            "in the scene such as a TotalSegmentator result). The models run in a separate "
            "process; Slicer stays responsive and Cancel leaves the scene as it was."
        )
        self.parent.acknowledgementText = _(
            "MTKD implements multi-task, multi-scale, contrastive knowledge distillation for CT "
            "segmentation on PyTorch and MONAI."
        )


@parameterNodeWrapper
class MTKDSegmentParameterNode:
    """What the scene remembers: inputs, the chosen models (library keys or a path), device."""

    inputVolume: vtkMRMLScalarVolumeNode
    studentModel: str = ""
    device: str = "auto"  # any device the engine accepts: the list differs between machines
    keepLargest: bool = False  # every structure's largest part only (off: the model's choice)
    teacherIsSegmentation: bool = False
    teacherModel: str = ""
    teacherPath: str = ""
    teacherSegmentation: vtkMRMLSegmentationNode
    referenceSegmentation: vtkMRMLSegmentationNode
    comparisonTable: vtkMRMLTableNode
    costsTable: vtkMRMLTableNode


class MTKDSegmentWidget(ModuleWidget):
    def setup(self) -> None:
        self.logic = MTKDSegmentLogic()
        self.loopVersionShown = None  # the loop version last preselected
        self.setupModule(
            "MTKDSegment",
            {
                "applyButton": self.onApplyButton,
                "compareButton": self.onCompareButton,
                "importFolderButton": self.onImportFolder,
                "importZipButton": self.onImportZip,
                "deleteModelButton": self.onDeleteModel,
                "refreshLibraryButton": self.refreshLibrary,
                "checkEnvironmentButton": self.onCheckEnvironment,
                "installDependenciesButton": self.onInstallDependencies,
            },
        )
        self.segmentView = TaskView(self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel)
        self.compareView = TaskView(self.ui.compareButton, self.ui.progressBar, self.ui.statusLabel)
        self.environmentView = TaskView(
            self.ui.checkEnvironmentButton, self.ui.progressBar, self.ui.statusLabel
        )
        self.ui.libraryPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.libraryPathLineEdit.currentPath = str(library_root())
        self.ui.teacherPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Files
        self.ui.studentModelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.teacherModelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.teacherPathLineEdit.connect("currentPathChanged(QString)", self.onModelChosen)
        self.ui.libraryPathLineEdit.connect("currentPathChanged(QString)", self.onLibraryMoved)
        self.deviceChoice = DeviceChoice(self.ui.deviceComboBox, self.onDeviceChosen)
        self.refreshLibrary()
        self.initializeParameterNode()
        self.deviceChoice.detect()

    def stopWork(self) -> None:
        """Cancel what runs (returns at once: the processes are stopped in the background)."""
        for view in (self.segmentView, self.compareView, self.environmentView):
            view.cancel()

    def cleanup(self) -> None:
        """The module is unloaded (Slicer quits, or the module is reloaded): also end the
        engine worker, without waiting for it."""
        ModuleWidget.cleanup(self)
        stop_shared_worker()

    def enter(self) -> None:
        ModuleWidget.enter(self)
        self.deviceChoice.detect()  # at once when known; asks again when PyTorch was missing
        self.preselectLoopVersion()

    def preselectLoopVersion(self) -> None:
        """Choose the current version of the annotate-then-distill loop in use (MTKD Train
        names it in the settings) as the student, once each time it changes."""
        from MTKDLib.distill_loop import current_version_key

        key = current_version_key(loopFolder())
        node = self._parameterNode
        if node is None or not key or key == self.loopVersionShown:
            return
        if self.ui.studentModelComboBox.findData(key) >= 0:
            node.studentModel = key
            self.loopVersionShown = key

    def onDeviceChosen(self, device: str) -> None:
        if self._parameterNode is not None:
            self._parameterNode.device = device

    def onParameterNode(self) -> None:
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume and not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = volume

    # --- the state of the panel -------------------------------------------------------------

    def updateGui(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        self.deviceChoice.show(node.device)
        self._select(self.ui.studentModelComboBox, node.studentModel)
        self._select(self.ui.teacherModelComboBox, node.teacherModel)
        if node.teacherPath and self.ui.teacherPathLineEdit.currentPath != node.teacherPath:
            self.ui.teacherPathLineEdit.currentPath = node.teacherPath
        fromNode = node.teacherIsSegmentation
        otherPath = node.teacherModel == OTHER_TEACHER
        self.ui.teacherModelComboBox.enabled = not fromNode
        self.ui.teacherPathLineEdit.enabled = not fromNode and otherPath
        self.ui.teacherSegmentationSelector.enabled = fromNode
        haveInput = bool(node.inputVolume and node.studentModel)
        self.ui.applyButton.enabled = self.segmentView.running or (
            haveInput and not self.compareView.running
        )
        teacherReady = node.teacherSegmentation if fromNode else self._teacherSource()
        self.ui.compareButton.enabled = self.compareView.running or (
            haveInput and bool(teacherReady) and not self.segmentView.running
        )
        self.ui.comparisonTableView.setMRMLTableNode(node.comparisonTable)
        self.ui.modelCostsTableView.setMRMLTableNode(node.costsTable)

    @staticmethod
    def _select(comboBox, key: str) -> None:
        index = comboBox.findData(key)
        if index >= 0 and comboBox.currentIndex != index:
            comboBox.currentIndex = index

    def onModelChosen(self, *_args) -> None:
        if self._parameterNode is None:
            return
        self._parameterNode.studentModel = self.ui.studentModelComboBox.currentData or ""
        self._parameterNode.teacherModel = self.ui.teacherModelComboBox.currentData or ""
        self._parameterNode.teacherPath = self.ui.teacherPathLineEdit.currentPath

    def _teacherSource(self) -> str:
        node = self._parameterNode
        if node.teacherModel == OTHER_TEACHER:
            return node.teacherPath
        return self.logic.modelPath(node.teacherModel) if node.teacherModel else ""

    # --- segment and compare -----------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.segmentView.running:
            self.segmentView.cancel()
            return
        node = self._parameterNode
        student = self.logic.modelPath(node.studentModel)
        if not self.logic.ensureDependencies() or not ensure_model_extras(student):
            return
        self.segmentView.start(
            lambda: self.logic.segmenter.start(
                node.inputVolume,
                student,
                node.device,
                model_name=self.logic.modelName(node.studentModel),
                keep_largest=node.keepLargest,
            ),
            self.showSegmentation,
        )
        self.updateGui()

    def showSegmentation(self, segmentationNode) -> None:
        segmentationNode.CreateClosedSurfaceRepresentation()
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume)
        self.updateGui()

    def onCompareButton(self) -> None:
        if self.compareView.running:
            self.compareView.cancel()
            return
        node = self._parameterNode
        student = self.logic.modelPath(node.studentModel)
        teacher = node.teacherSegmentation if node.teacherIsSegmentation else self._teacherSource()
        models = [student] if node.teacherIsSegmentation else [student, teacher]
        if not self.logic.ensureDependencies() or not ensure_model_extras(*models):
            return
        self.compareView.start(
            lambda: self.logic.comparer.start(
                node.inputVolume,
                student,
                teacher,
                node.device,
                reference=node.referenceSegmentation,
            ),
            self.showComparison,
        )
        self.updateGui()

    def showComparison(self, nodes) -> None:
        self._parameterNode.comparisonTable = nodes.structures
        self._parameterNode.costsTable = nodes.models
        for run in (nodes.summary["teacher"], nodes.summary["student"]):
            peak = run.get("peak_memory_bytes")
            memory = "n/a" if peak is None else f"{peak / 2**20:.0f} MB"
            self.ui.statusLabel.text += f"\n{run['name']}: {run['seconds']:.2f} s, {memory}"
        self.updateGui()

    # --- model library ----------------------------------------------------------------------

    def refreshLibrary(self) -> None:
        from MTKDLib.library_table import COLUMNS, library_rows, model_choices

        entries = self.logic.library().entries()
        table = self.ui.libraryTableWidget
        table.clear()
        table.setColumnCount(len(COLUMNS))
        table.setHorizontalHeaderLabels(list(COLUMNS))
        rows = library_rows(entries)
        table.setRowCount(len(rows))
        for row, (entry, texts) in enumerate(zip(entries, rows)):
            for column, text in enumerate(texts):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, entry.key)
                table.setItem(row, column, item)
        table.resizeColumnsToContents()
        choices = model_choices(entries)
        for comboBox, extra in (
            (self.ui.studentModelComboBox, []),
            (self.ui.teacherModelComboBox, [(_("Other file or folder..."), OTHER_TEACHER)]),
        ):
            wasBlocked = comboBox.blockSignals(True)
            comboBox.clear()
            for text, key in [*choices, *extra]:
                comboBox.addItem(text, key)
            comboBox.blockSignals(wasBlocked)
        self.updateGui()

    def onLibraryMoved(self, path: str) -> None:
        if path and Path(path).is_dir():
            set_library_root(path)
            self.refreshLibrary()

    def _importModel(self, source: str) -> None:
        if not source or not self.logic.ensureDependencies():  # opening a model needs torch
            return
        try:
            with slicer.util.WaitCursor():
                entry = self.logic.library().import_model(source)
        except Exception as error:  # noqa: BLE001 - MTKDError names the file and the problem
            slicer.util.errorDisplay(f"Import failed: {error}", windowTitle="MTKD")
            return
        self.ui.statusLabel.text = f"Imported '{entry.name}' into the model library."
        self.refreshLibrary()

    def onImportFolder(self) -> None:
        self._importModel(
            qt.QFileDialog.getExistingDirectory(
                slicer.util.mainWindow(), _("Run, model or exported model folder")
            )
        )

    def onImportZip(self) -> None:
        self._importModel(
            qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Zipped model"), "", "Zip archives (*.zip)"
            )
        )

    def onDeleteModel(self) -> None:
        item = self.ui.libraryTableWidget.currentItem()
        if item is None:
            return
        key = item.data(qt.Qt.UserRole)
        from MTKDLib.distill_loop import loop_version_warning

        name = self.logic.library().get(key).name
        folder = loopFolder()
        warning = loop_version_warning(self.logic.library(), key, [folder] if folder else [])
        question = _("Delete the model '{name}' from the library? Its files are removed.").format(
            name=name
        )
        if not slicer.util.confirmYesNoDisplay(
            f"{warning}\n\n{question}" if warning else question, windowTitle="MTKD"
        ):
            return
        self.logic.library().delete(key)
        self.refreshLibrary()

    # --- environment ------------------------------------------------------------------------

    def onCheckEnvironment(self) -> None:
        from mtkd.environment import format_environment
        from MTKDLib.dependencies import environment_task

        def show(report) -> None:
            self.ui.environmentTextEdit.setPlainText(format_environment(report))

        self.ui.environmentCollapsibleButton.collapsed = False
        if self.environmentView.running:
            self.environmentView.cancel()
        else:
            self.environmentView.start(environment_task, show)

    def onInstallDependencies(self) -> None:
        if self.logic.ensureDependencies():
            self.ui.statusLabel.text = _("All of MTKD's Python packages are installed.")
            self.deviceChoice.detect(refresh=True)  # PyTorch may have come just now


def loopFolder() -> str:
    """The training set of the annotate-then-distill loop MTKD Train used last ("": none)."""
    from MTKDLib.distill_loop import LOOP_SETTING

    return str(qt.QSettings().value(LOOP_SETTING) or "")


class MTKDSegmentLogic(ScriptedLoadableModuleLogic):
    """The module's logic for ``slicer.mrmlScene``: segment and compare (``MTKDLib``, no Qt)
    and the model library (``mtkd.library``). The jobs run on the session's engine worker;
    ``useWorker=False``: each in a new process."""

    def __init__(self, scene=None, useWorker: bool = True) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        scene = scene or slicer.mrmlScene
        worker = shared_worker() if useWorker else None
        self.segmenter = SegmentLogic(scene, worker=worker)
        self.comparer = CompareLogic(scene, worker=worker)
        self.libraryRoot = None  # None: the folder in the user's settings

    def getParameterNode(self):
        return MTKDSegmentParameterNode(super().getParameterNode())

    def library(self):
        return model_library(self.libraryRoot)

    def modelPath(self, key: str) -> str:
        return str(self.library().path_of(key))

    def modelName(self, key: str) -> str:
        return self.library().get(key).name

    @staticmethod
    def ensureDependencies() -> bool:
        return ensure_engine_dependencies()


class MTKDSegmentTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Developer mode > Reload and Test, or the module's CTest), driving the
    panel as a user does: nodes chosen in the selectors, buttons pressed, the status line and
    the result nodes read.

    - :meth:`test_panel` always runs (no torch needed): the panel with an empty model library.
    - :meth:`test_segment_and_compare` runs when torch and MONAI are installed (otherwise it
      says so and returns): a tiny teacher and student trained here (``mtkd demo --quick``),
      Segment, Cancel and Compare on the bundled CT.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_panel()
        self.setUp()
        self.test_segment_and_compare()

    @staticmethod
    def panel():
        slicer.util.selectModule("MTKDSegment")
        return slicer.modules.mtkdsegment.widgetRepresentation().self()

    def test_panel(self):
        import numpy as np

        self.delayDisplay("MTKD Segment's panel, with an empty model library")
        panel = self.panel()
        ui = panel.ui
        panel.logic.libraryRoot = Path(tempfile.mkdtemp(prefix="mtkd-selftest-library-"))
        try:
            ui.refreshLibraryButton.click()
            self.assertEqual(ui.studentModelComboBox.count, 0)
            self.assertEqual(ui.libraryTableWidget.rowCount, 0)
            array = np.zeros((8, 32, 32), dtype=np.int16)
            volume = slicer.util.addVolumeFromArray(array, name="self-test CT")
            ui.inputVolumeSelector.setCurrentNode(volume)
            self.assertEqual(panel._parameterNode.inputVolume.GetID(), volume.GetID())
            self.assertFalse(ui.applyButton.enabled)  # no student model yet
            ui.applyButton.click()  # a disabled button does nothing
            self.assertFalse(panel.segmentView.running)

            devices = [ui.deviceComboBox.itemData(i) for i in range(ui.deviceComboBox.count)]
            self.assertEqual(devices[:2], ["auto", "cpu"])
            choose_item(ui.deviceComboBox, "cpu")
            self.assertEqual(panel._parameterNode.device, "cpu")

            ui.teacherIsSegmentationCheckBox.checked = True
            self.assertTrue(panel._parameterNode.teacherIsSegmentation)
            self.assertTrue(ui.teacherSegmentationSelector.enabled)
            self.assertFalse(ui.teacherModelComboBox.enabled)
            self.assertFalse(ui.compareButton.enabled)  # no student, no teacher segmentation
        finally:
            panel.logic.libraryRoot = None
            panel.refreshLibrary()
        self.delayDisplay("MTKD Segment panel test passed")

    def test_segment_and_compare(self):
        from MTKDLib.mrml_io import labelmap_array, load_segmentation, segment_names

        panel = self.panel()
        ui = panel.ui
        models = ["student_kd", "teacher"]
        with demo_scene(
            panel.logic, "Segmentation test", self.delayDisplay, models, panel.refreshLibrary
        ) as demo:
            if demo is None:
                return
            work, volume = demo.work, demo.volume
            student, teacher = (demo.models[name] for name in models)
            ui.refreshLibraryButton.click()
            self.assertEqual(ui.libraryTableWidget.rowCount, 2)

            oblique = vtk.vtkMatrix4x4()
            volume.GetIJKToRASDirectionMatrix(oblique)
            rotation = vtk.vtkTransform()
            rotation.RotateZ(25)
            vtk.vtkMatrix4x4.Multiply4x4(rotation.GetMatrix(), oblique, oblique)
            volume.SetIJKToRASDirectionMatrix(oblique)
            ui.inputVolumeSelector.setCurrentNode(volume)
            choose_item(ui.studentModelComboBox, student.key)
            choose_item(ui.deviceComboBox, "cpu")
            self.assertTrue(ui.applyButton.enabled)

            self.delayDisplay("Segment, then Cancel: nothing is added to the scene")
            segmentations = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
            ui.applyButton.click()
            self.assertTrue(panel.segmentView.running)
            ui.applyButton.click()  # the same button reads "Cancel" while the model runs
            self.assertFalse(panel.segmentView.running)
            self.assertIn("Cancelled", ui.statusLabel.text)
            self.assertEqual(
                slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), segmentations
            )

            self.delayDisplay("Segmenting with the student")
            ui.applyButton.click()
            process_events_until(lambda: not panel.segmentView.running, 1800, "Segment")
            self.assertEqual(ui.statusLabel.text, "Done.")
            segmentation = slicer.mrmlScene.GetFirstNodeByName(f"{volume.GetName()} {student.name}")
            self.assertIsNotNone(segmentation)
            self.assertEqual(segment_names(segmentation), student.labels)
            self.assertGreater(int(labelmap_array(segmentation, volume).max()), 0)

            self.delayDisplay("Comparing the student with the teacher model")
            ui.teacherIsSegmentationCheckBox.checked = False
            choose_item(ui.teacherModelComboBox, teacher.key)
            ui.compareButton.click()
            process_events_until(lambda: not panel.compareView.running, 1800, "Compare")
            self.assertTrue(ui.statusLabel.text.startswith("Done."), ui.statusLabel.text)
            structures = panel._parameterNode.comparisonTable
            self.assertEqual(structures.GetNumberOfRows(), len(student.labels))
            self.assertEqual(panel._parameterNode.costsTable.GetNumberOfRows(), 2)
            self.assertEqual(ui.comparisonTableView.mrmlTableNode().GetID(), structures.GetID())

            self.delayDisplay("Comparing with a segmentation node as the teacher")
            stored = load_segmentation(
                slicer.mrmlScene, work / "demo" / "abdomen_student.seg.nrrd", "stored", volume
            )
            ui.teacherIsSegmentationCheckBox.checked = True
            ui.teacherSegmentationSelector.setCurrentNode(stored)
            self.assertTrue(ui.compareButton.enabled)
            segmentations = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
            ui.compareButton.click()
            process_events_until(lambda: not panel.compareView.running, 1800, "Compare")
            self.assertTrue(ui.statusLabel.text.startswith("Done."), ui.statusLabel.text)
            self.assertNotEqual(panel._parameterNode.comparisonTable.GetID(), structures.GetID())
            added = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
            self.assertEqual(added - segmentations, 2)  # student and disagreement, no teacher
        self.delayDisplay("MTKD Segment test passed")
