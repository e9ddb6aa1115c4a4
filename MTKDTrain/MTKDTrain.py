"""MTKDTrain: distill a fast student inside Slicer, on the user's own cases, with the training
visible while it runs, and the annotate-then-distill loop.

The widget is a thin layer over ``MTKDLib`` (no Qt; tested against real MRML with
``slicer-core``): training runs as ``mtkd distill`` in a separate process and is followed
through its run folder.
"""

import getpass
import tempfile
from pathlib import Path
from typing import Annotated

import ctk
import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

from MTKDLib.gui import ModuleWidget, model_library
from MTKDLib.slicer_setup import ensure_engine_dependencies
from MTKDLib.train_config import (
    DEVICES,
    FEATURE_LOSSES,
    OUTPUT_LOSSES,
    TrainingOptions,
    parse_pairs,
    server_commands,
)
from MTKDLib.train_logic import TrainLogic

POLL_MILLISECONDS = 500  # the run's plots and status update at most twice a second
TAPS = ("thesis", "all_scales", "custom", "none")
STUDENTS = ("thesis_s1", "thesis_s2")


class MTKDTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MTKD Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MTKD contributors"]
        self.parent.helpText = _(
            "Distill a small, fast student from a teacher on your own labelled CTs: build the "
            "training set from the scene, configure and start the distillation (it runs in a "
            "separate process, with live loss plots), stop and resume it, and improve the "
            "student case by case: correct its result in the Segment Editor, add it to the "
            "training set and distill again."
        )
        self.parent.acknowledgementText = _(
            "MTKD implements multi-task, multi-scale, contrastive knowledge distillation for CT "
            "segmentation on PyTorch and MONAI."
        )


@parameterNodeWrapper
class MTKDTrainParameterNode:
    """What the scene remembers of the panel."""

    datasetFolder: Path
    caseVolume: vtkMRMLScalarVolumeNode
    caseSegmentation: vtkMRMLSegmentationNode
    student: Annotated[str, Choice(list(STUDENTS))] = "thesis_s1"
    taps: Annotated[str, Choice(list(TAPS))] = "thesis"
    featureLoss: Annotated[str, Choice(list(FEATURE_LOSSES))] = "infonce"
    weightEE: float = 0.1
    weightBB: float = 0.2
    weightDD: float = 0.1
    outputLoss: Annotated[str, Choice(list(OUTPUT_LOSSES))] = "pmd"
    outputWeight: float = 0.2
    epochs: int = 20
    studentFraction: float = 0.5
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    runName: str = "student"
    runsFolder: Path
    runFolder: str = ""  # the run shown in the panel (re-attached when the scene is loaded)
    correctedVolume: vtkMRMLScalarVolumeNode
    correctedSegmentation: vtkMRMLSegmentationNode


class MTKDTrainWidget(ModuleWidget):
    def __init__(self, parent=None) -> None:
        ModuleWidget.__init__(self, parent)
        self.run = None  # the followed TrainingRun
        self.cases = []  # (volume, segmentation) pairs to export

    def setup(self) -> None:
        self.logic = MTKDTrainLogic()
        self.setupModule(
            "MTKDTrain",
            {
                "addPairButton": self.onAddPair,
                "removePairButton": self.onRemovePair,
                "exportButton": self.onExport,
                "startButton": self.onStart,
                "stopButton": self.onStop,
                "resumeButton": self.onResume,
                "attachButton": self.onAttach,
                "addToLibraryButton": self.onAddToLibrary,
                "beginLoopButton": self.onBeginLoop,
                "addCaseButton": self.onAddCase,
                "distillAgainButton": self.onDistillAgain,
                "switchVersionButton": self.onSwitchVersion,
                "rollbackButton": self.onRollback,
            },
        )
        for pathEdit in (self.ui.datasetPathLineEdit, self.ui.runsFolderPathLineEdit):
            pathEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetChosen)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MILLISECONDS)
        self.timer.timeout.connect(self.pollRun)
        self.refreshLibraryChoices()
        self.initializeParameterNode()

    def stopWork(self) -> None:
        self.timer.stop()  # a run keeps going in its process; Attach follows it again
        self.run = None

    def enter(self) -> None:
        ModuleWidget.enter(self)
        self.refreshLibraryChoices()

    def onParameterNode(self) -> None:
        node = self._parameterNode
        if not node.runsFolder or str(node.runsFolder) == ".":
            node.runsFolder = Path.home() / "mtkd-runs"
        if node.runFolder and self.run is None and Path(node.runFolder).is_dir():
            self.follow(self.logic.trainer.attach(node.runFolder))  # re-attach after a reload

    def updateGui(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        running = bool(self.run is not None and self.run.running)
        self.ui.customPairsTextEdit.enabled = node.taps == "custom"
        for spinBox in (self.ui.weightEESpinBox, self.ui.weightBBSpinBox, self.ui.weightDDSpinBox):
            spinBox.enabled = node.taps == "thesis"
        self.ui.startButton.enabled = not running and bool(self.teacherPath())
        self.ui.stopButton.enabled = running
        self.ui.resumeButton.enabled = (
            not running and self.run is not None and self.run.state.state == "interrupted"
        )
        self.ui.addToLibraryButton.enabled = (
            self.run is not None and self.run.state.state == "finished"
        )
        self.ui.addPairButton.enabled = bool(node.caseVolume and node.caseSegmentation)
        self.ui.addCaseButton.enabled = bool(node.correctedVolume and node.correctedSegmentation)
        self.updateLoop()

    # --- training set -----------------------------------------------------------------------

    def onAddPair(self) -> None:
        node = self._parameterNode
        self.cases.append((node.caseVolume, node.caseSegmentation))
        self.showCases()

    def onRemovePair(self) -> None:
        row = self.ui.casesTableWidget.currentRow()
        if 0 <= row < len(self.cases):
            del self.cases[row]
            self.showCases()

    def showCases(self) -> None:
        from MTKDLib.training_set import SceneCase, plan_labels

        table = self.ui.casesTableWidget
        table.clear()
        table.setColumnCount(2)
        table.setHorizontalHeaderLabels([_("CT volume"), _("Segmentation")])
        table.setRowCount(len(self.cases))
        for row, (volume, segmentation) in enumerate(self.cases):
            table.setItem(row, 0, qt.QTableWidgetItem(volume.GetName()))
            table.setItem(row, 1, qt.QTableWidgetItem(segmentation.GetName()))
        if not self.cases:
            self.ui.datasetSummaryLabel.text = ""
            return
        plan = plan_labels([SceneCase(v, s) for v, s in self.cases])
        text = _("{count} cases; structures: {names}").format(
            count=len(self.cases), names=", ".join(plan.structures)
        )
        if plan.problems:
            text += "\n" + "\n".join(plan.problems)
            text += "\n" + _("Export keeps what every case has: {names}").format(
                names=", ".join(plan.common) or "-"
            )
        self.ui.datasetSummaryLabel.text = text

    def onDatasetChosen(self, path: str) -> None:
        """A folder the engine reads is used as it is; say what it holds."""
        from MTKDLib.training_set import dataset_summary

        if path and Path(path).is_dir() and any(Path(path).iterdir()):
            self.ui.datasetSummaryLabel.text = dataset_summary(path)
        self.updateGui()

    def onExport(self) -> None:
        from MTKDLib.training_set import SceneCase, export_training_set, plan_labels

        folder = self._parameterNode.datasetFolder
        cases = [SceneCase(v, s) for v, s in self.cases]
        try:
            with slicer.util.WaitCursor():
                plan = plan_labels(cases)
                export_training_set(cases, folder, plan.common, added_by=getpass.getuser())
        except Exception as error:  # noqa: BLE001 - names the case and the problem
            slicer.util.errorDisplay(_("Export failed: {error}").format(error=error))
            return
        self.ui.datasetSummaryLabel.text = _("Exported {count} cases to {folder}").format(
            count=len(cases), folder=folder
        )

    # --- configuration and run --------------------------------------------------------------

    def refreshLibraryChoices(self) -> None:
        from MTKDLib.library_table import model_choices

        entries = self.logic.library().entries()
        for comboBox in (self.ui.teacherModelComboBox, self.ui.loopStudentComboBox):
            current = comboBox.currentData
            wasBlocked = comboBox.blockSignals(True)
            comboBox.clear()
            for text, key in model_choices(entries):
                comboBox.addItem(text, key)
            index = comboBox.findData(current)
            comboBox.currentIndex = max(index, 0)
            comboBox.blockSignals(wasBlocked)

    def teacherPath(self) -> str:
        key = self.ui.teacherModelComboBox.currentData
        return str(self.logic.library().path_of(key)) if key else ""

    def options(self) -> TrainingOptions:
        node = self._parameterNode
        weights = {"E-E": node.weightEE, "B-B": node.weightBB, "D-D": node.weightDD}
        return TrainingOptions(
            dataset=str(node.datasetFolder),
            teacher=self.teacherPath(),
            name=node.runName,
            student=node.student,
            taps=None if node.taps == "custom" else node.taps,
            custom_pairs=parse_pairs(self.ui.customPairsTextEdit.plainText),
            feature_loss=node.featureLoss,
            scale_weights=weights if node.taps == "thesis" else None,
            output_loss=node.outputLoss,
            output_weight=node.outputWeight,
            epochs=node.epochs,
            student_fraction=node.studentFraction,
            device=node.device,
        )

    def runFolderFor(self, name: str) -> Path:
        return Path(self._parameterNode.runsFolder) / name

    def onStart(self, options=None) -> None:
        if not self.logic.ensureDependencies():
            return
        try:
            options = options or self.options()
            self.follow(self.logic.trainer.start(options, self.runFolderFor(options.name)))
        except Exception as error:  # noqa: BLE001 - a bad configuration, named
            slicer.util.errorDisplay(_("Cannot start: {error}").format(error=error))

    def onStop(self) -> None:
        try:
            self.run.stop()
        except Exception as error:  # noqa: BLE001 - e.g. a run on another machine
            slicer.util.errorDisplay(str(error))
        self.ui.statusLabel.text = _("Stopping at the next safe point (saving a checkpoint)...")

    def onResume(self) -> None:
        if self.logic.ensureDependencies():
            self.follow(self.logic.trainer.resume(self.run.run_dir))

    def onAttach(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Run folder to follow")
        )
        if folder:
            try:
                self.follow(self.logic.trainer.attach(folder))
            except Exception as error:  # noqa: BLE001 - not a run folder, named
                slicer.util.errorDisplay(str(error))

    def follow(self, run) -> None:
        self.run = run
        self._parameterNode.runFolder = str(run.run_dir)
        self.ui.serverCommandTextEdit.setPlainText(server_commands(run.run_dir))
        table, losses, validation = run.plots.nodes()
        self.ui.metricsTableView.setMRMLTableNode(table)
        self.ui.lossPlotWidget.mrmlPlotViewNode().SetPlotChartNodeID(losses.GetID())
        self.ui.dicePlotWidget.mrmlPlotViewNode().SetPlotChartNodeID(validation.GetID())
        self.pollRun()
        self.timer.start()

    def pollRun(self) -> None:
        from MTKDLib.run_monitor import format_status

        if self.run is None:
            self.timer.stop()
            return
        state = self.run.poll()
        self.ui.progressBar.value = int(round(100 * state.progress))
        self.ui.statusLabel.text = format_status(state)
        self.ui.logTextEdit.setPlainText("\n".join(state.log[-20:]))
        if state.ended and not self.run.running:
            self.timer.stop()
            if state.state == "failed":
                slicer.util.errorDisplay(
                    _("The training process failed: {error}").format(error=state.error),
                    detailedText="\n".join(state.log),
                )
            elif state.state == "finished" and self.logic.loop(self._datasetFolder()):
                self.recordLoopVersion()
        self.updateGui()

    def onAddToLibrary(self) -> None:
        try:
            entry = self.logic.library().import_model(self.run.run_dir)
        except Exception as error:  # noqa: BLE001 - MTKDError naming the file
            slicer.util.errorDisplay(str(error))
            return
        self.ui.statusLabel.text = _("'{name}' is in the model library.").format(name=entry.name)
        self.refreshLibraryChoices()

    # --- the annotate-then-distill loop -----------------------------------------------------

    def _datasetFolder(self) -> Path:
        return Path(self._parameterNode.datasetFolder)

    def updateLoop(self) -> None:
        loop = self.logic.loop(self._datasetFolder())
        current = loop.current() if loop else None
        self.ui.currentVersionLabel.text = current.name if current else _("none")
        self.ui.distillAgainButton.enabled = current is not None and not (
            self.run is not None and self.run.running
        )
        self.ui.rollbackButton.enabled = current is not None and current.previous is not None
        versions = loop.versions() if loop else []
        table = self.ui.versionsTableWidget
        table.clear()
        columns = [_("Version"), _("Model"), _("Cases added"), _("Dice before"), _("Dice after")]
        table.setColumnCount(len(columns))
        table.setHorizontalHeaderLabels(columns)
        table.setRowCount(len(versions))
        for row, version in enumerate(versions):
            texts = [
                f"v{version.number}"
                + (" (current)" if current and version.key == current.key else ""),  # fmt: skip
                version.name,
                str(len(version.cases_added)),
                "" if version.val_dice_before is None else f"{version.val_dice_before:.3f}",
                "" if version.val_dice_after is None else f"{version.val_dice_after:.3f}",
            ]
            for column, text in enumerate(texts):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, version.key)
                table.setItem(row, column, item)

    def onBeginLoop(self) -> None:
        key = self.ui.loopStudentComboBox.currentData
        try:
            self.logic.startLoop(self._datasetFolder(), key, self.teacherPath())
        except Exception as error:  # noqa: BLE001 - e.g. no training set there yet
            slicer.util.errorDisplay(str(error))
        self.updateGui()

    def onAddCase(self) -> None:
        from MTKDLib.training_set import SceneCase

        node = self._parameterNode
        try:
            caseId = self.logic.loop(self._datasetFolder()).add_case(
                SceneCase(node.correctedVolume, node.correctedSegmentation)
            )
        except Exception as error:  # noqa: BLE001 - names the missing or misnamed segment
            slicer.util.errorDisplay(_("Cannot add the case: {error}").format(error=error))
            return
        self.ui.statusLabel.text = _("Added case '{case}' to the training set.").format(case=caseId)

    def onDistillAgain(self) -> None:
        loop = self.logic.loop(self._datasetFolder())
        self.onStart(loop.next_options(self.options()))

    def recordLoopVersion(self) -> None:
        loop = self.logic.loop(self._datasetFolder())
        current = loop.current()
        if current is None or current.run == str(self.run.run_dir):
            return
        if str(self.run.run_dir) in {v.run for v in loop.versions()}:
            return
        version = loop.record(self.run.run_dir)
        self.ui.statusLabel.text = _(
            "New version {name}: validation Dice {before} before, {after} after."
        ).format(name=version.name, before=version.val_dice_before, after=version.val_dice_after)
        self.refreshLibraryChoices()

    def _selectedVersion(self):
        item = self.ui.versionsTableWidget.currentItem()
        return item.data(qt.Qt.UserRole) if item else None

    def onSwitchVersion(self) -> None:
        key = self._selectedVersion()
        if key:
            self.logic.loop(self._datasetFolder()).switch(key)
            self.updateGui()

    def onRollback(self) -> None:
        self.logic.loop(self._datasetFolder()).rollback()
        self.updateGui()


class MTKDTrainLogic(ScriptedLoadableModuleLogic):
    """The module's logic for ``slicer.mrmlScene``: runs (``MTKDLib.train_logic``), the
    training set and the loop (``MTKDLib``), the model library (``mtkd.library``)."""

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.trainer = TrainLogic(scene or slicer.mrmlScene)
        self.libraryRoot = None  # None: the folder in the user's settings

    def getParameterNode(self):
        return MTKDTrainParameterNode(super().getParameterNode())

    def library(self):
        return model_library(self.libraryRoot)

    def loop(self, datasetFolder):
        """The loop of this training set, or None where none was started."""
        from MTKDLib.distill_loop import LOOP_FILE, DistillLoop

        folder = Path(datasetFolder)
        if not (folder / LOOP_FILE).is_file():
            return None
        return DistillLoop(folder, self.library())

    def startLoop(self, datasetFolder, studentKey: str, teacher: str):
        from MTKDLib.distill_loop import DistillLoop

        return DistillLoop(datasetFolder, self.library()).begin(studentKey, teacher)

    @staticmethod
    def ensureDependencies() -> bool:
        return ensure_engine_dependencies()


class MTKDTrainTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: a training set from scene nodes, a short distillation in a background
    process, stopped, resumed and re-attached, then one turn of the loop."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_distill_in_the_background()

    def test_distill_in_the_background(self):
        import time

        from mtkd.demo import bundled_sample
        from MTKDLib.distill_loop import DistillLoop
        from MTKDLib.mrml_io import load_segmentation
        from MTKDLib.process import EngineTask
        from MTKDLib.training_set import SceneCase, export_training_set

        work = Path(tempfile.mkdtemp(prefix="mtkd-selftest-"))
        self.delayDisplay("Training a tiny teacher on the bundled CT (mtkd demo --quick)")
        EngineTask(
            lambda _: ["demo", "--quick", "--output", str(work / "demo")], lambda _: None
        ).wait(timeout=1800)
        logic = MTKDTrainLogic()
        logic.libraryRoot = work / "library"
        ct = bundled_sample()[0]
        volume = slicer.util.loadVolume(str(ct))
        labels = load_segmentation(
            slicer.mrmlScene, work / "demo" / "abdomen_student.seg.nrrd", "labels", volume
        )
        cases = [SceneCase(volume, labels, f"case{i}") for i in range(5)]
        export_training_set(cases, work / "dataset")

        def waitFor(run, condition, timeout=1800):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                state = run.poll()
                if condition(state):
                    return state
                self.assertNotEqual(state.state, "failed", state.error)
                slicer.app.processEvents()
                time.sleep(0.2)
            self.fail("timed out")

        options = TrainingOptions(dataset=str(work / "dataset"),
                                  teacher=str(work / "demo" / "teacher"), epochs=30,
                                  batch_size=4, student_fraction=1.0)  # fmt: skip
        run = logic.trainer.start(options, work / "runs" / "student")
        waitFor(run, lambda s: s.epoch >= 1)
        run.stop()
        self.assertEqual(waitFor(run, lambda s: s.ended).state, "interrupted")
        run = logic.trainer.resume(run.run_dir)
        waitFor(run, lambda s: s.state == "finished")
        attached = logic.trainer.attach(run.run_dir).poll()
        self.assertEqual(attached.epoch, 30)

        student = logic.library().import_model(run.run_dir)
        loop = DistillLoop(work / "dataset", logic.library())
        loop.begin(student.key, work / "demo" / "teacher")
        loop.add_case(SceneCase(volume, labels, "corrected"))
        again = logic.trainer.start(loop.next_options(options), work / "runs" / "v2")
        waitFor(again, lambda s: s.state == "finished")
        version = loop.record(again.run_dir)
        self.assertEqual(version.previous, student.key)
        self.assertEqual(version.cases_added, ["corrected"])
        self.delayDisplay("MTKDTrain test passed")
