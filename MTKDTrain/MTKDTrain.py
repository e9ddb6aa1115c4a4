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

from MTKDLib.gui import (
    DeviceChoice,
    ModuleWidget,
    choose_item,
    demo_scene,
    model_library,
    process_events_until,
)
from MTKDLib.slicer_setup import ensure_engine_dependencies, ensure_model_extras
from MTKDLib.train_config import (
    FEATURE_LOSSES,
    OUTPUT_LOSSES,
    TrainingOptions,
    parse_pairs,
    server_commands,
)
from MTKDLib.train_logic import TrainLogic
from MTKDLib.worker import shared_worker, stop_shared_worker

POLL_MILLISECONDS = 500  # the run's plots and status update at most twice a second
# singleton tags of the plot view nodes the panel's two plot widgets show (one per widget)
LOSS_PLOT_VIEW = "MTKDTrain.LossPlotView"
DICE_PLOT_VIEW = "MTKDTrain.DicePlotView"
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
    # the recommended recipe (mtkd.config.RECOMMENDED_PRESET): the output term alone, Hinton's
    # KD per voxel at T 1, weight 1, also on the unlabelled training cases
    taps: Annotated[str, Choice(list(TAPS))] = "none"
    featureLoss: Annotated[str, Choice(list(FEATURE_LOSSES))] = "infonce"
    weightEE: float = 0.1
    weightBB: float = 0.2
    weightDD: float = 0.1
    outputLoss: Annotated[str, Choice(list(OUTPUT_LOSSES))] = "pmd"
    outputWeight: float = 1.0
    outputTemperature: float = 1.0
    useUnlabelled: bool = True
    precomputeTeacher: bool = False
    epochs: int = 20
    studentFraction: float = 0.5
    device: str = "auto"  # any device the engine accepts: the list differs between machines
    runName: str = "student"
    runsFolder: Path
    runFolder: str = ""  # the run shown in the panel (re-attached when the scene is loaded)
    correctedVolume: vtkMRMLScalarVolumeNode
    correctedSegmentation: vtkMRMLSegmentationNode
    casePatient: str = ""  # the corrected case's patient id (empty: the case itself)
    caseToTest: bool = False  # the corrected case goes to the loop's test cases


class MTKDTrainWidget(ModuleWidget):
    def __init__(self, parent=None) -> None:
        ModuleWidget.__init__(self, parent)
        self.run = None  # the followed TrainingRun
        self.scoring = None  # the loop's ScoringJob of a finished run, while it runs
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
                "markNotAnnotatedButton": self.onMarkNotAnnotated,
                "distillAgainButton": self.onDistillAgain,
                "switchVersionButton": self.onSwitchVersion,
                "rollbackButton": self.onRollback,
            },
        )
        for pathEdit in (self.ui.datasetPathLineEdit, self.ui.runsFolderPathLineEdit):
            pathEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetChosen)
        self.deviceChoice = DeviceChoice(self.ui.deviceComboBox, self.onDeviceChosen)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MILLISECONDS)
        self.timer.timeout.connect(self.pollRun)
        self.refreshLibraryChoices()
        self.initializeParameterNode()
        self.deviceChoice.detect()

    def stopWork(self) -> None:
        self.timer.stop()  # a run keeps going in its process; Attach follows it again
        self.run = None

    def cleanup(self) -> None:
        """The module is unloaded (Slicer quits, or the module is reloaded): also cancel the
        loop's scoring and end the engine worker, unless MTKD Segment has a job on it."""
        ModuleWidget.cleanup(self)
        if self.scoring is not None:
            self.scoringTimer.stop()
            self.scoring[2].cancel()
            self.scoring = None
        stop_shared_worker()

    def enter(self) -> None:
        ModuleWidget.enter(self)
        self.refreshLibraryChoices()
        self.deviceChoice.detect()  # at once when known; asks again when PyTorch was missing

    def onParameterNode(self) -> None:
        node = self._parameterNode
        if not node.runsFolder or str(node.runsFolder) == ".":
            node.runsFolder = Path.home() / "mtkd-runs"
        if node.runFolder and self.run is None and Path(node.runFolder).is_dir():
            try:  # re-attach after a reload
                run = self.logic.trainer.attach(node.runFolder)
            except Exception as error:  # noqa: BLE001 - e.g. no longer a run folder
                self.ui.statusLabel.text = _("Cannot follow {folder}: {error}").format(
                    folder=node.runFolder, error=error
                )
            else:
                self.follow(run)

    def onDeviceChosen(self, device: str) -> None:
        if self._parameterNode is not None:
            self._parameterNode.device = device

    def updateGui(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        self.deviceChoice.show(node.device)
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
        self.ui.markNotAnnotatedButton.enabled = bool(node.correctedSegmentation)
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
        from MTKDLib.training_set import chosen_folder, dataset_summary

        try:
            folder = chosen_folder(path)
        except ValueError:
            folder = None  # nothing chosen
        if folder is not None and self.logic.loop(folder) is not None:
            rememberLoop(folder)  # MTKD Segment preselects its current version
        if folder is not None and folder.is_dir() and any(folder.iterdir()):
            try:
                self.ui.datasetSummaryLabel.text = dataset_summary(folder)
            except ImportError as error:  # the engine's packages are not installed yet
                self.ui.datasetSummaryLabel.text = _(
                    "Install MTKD's Python packages to read this folder ({error})."
                ).format(error=error)
        self.updateGui()

    def onExport(self) -> None:
        from MTKDLib.training_set import SceneCase, chosen_folder, export_training_set, plan_labels

        cases = [SceneCase(v, s) for v, s in self.cases]
        try:
            folder = chosen_folder(self._parameterNode.datasetFolder)  # before the cases
            with slicer.util.WaitCursor():
                plan = plan_labels(cases)
                export_training_set(cases, folder, plan.common, added_by=getpass.getuser())
        except Exception as error:  # noqa: BLE001 - names the case and the problem
            message = _("Export failed: {error}").format(error=error)
            self.ui.datasetSummaryLabel.text = message
            slicer.util.errorDisplay(message)
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
        from MTKDLib.training_set import chosen_folder

        node = self._parameterNode
        weights = {"E-E": node.weightEE, "B-B": node.weightBB, "D-D": node.weightDD}
        return TrainingOptions(
            dataset=str(chosen_folder(node.datasetFolder)),
            teacher=self.teacherPath(),
            name=node.runName,
            student=node.student,
            taps=None if node.taps == "custom" else node.taps,
            custom_pairs=parse_pairs(self.ui.customPairsTextEdit.plainText),
            feature_loss=node.featureLoss,
            scale_weights=weights if node.taps == "thesis" else None,
            output_loss=node.outputLoss,
            output_weight=node.outputWeight,
            output_temperature=node.outputTemperature,
            use_unlabelled=node.useUnlabelled,
            precompute_teacher=node.precomputeTeacher,
            epochs=node.epochs,
            student_fraction=node.studentFraction,
            device=node.device,
        )

    def runFolderFor(self, name: str) -> Path:
        return Path(self._parameterNode.runsFolder) / name

    def onStart(self, options=None, runDir=None) -> None:
        if not self.logic.ensureDependencies():
            return
        try:
            options = options or self.options()
            if not ensure_model_extras(options.teacher):
                return
            runDir = runDir or self.runFolderFor(options.name)
            self.follow(self.logic.trainer.start(options, runDir))
        except Exception as error:  # noqa: BLE001 - a bad configuration, named
            slicer.util.errorDisplay(_("Cannot start: {error}").format(error=error))

    def onStop(self) -> None:
        """Ask the run to stop (returns at once; the run saves a checkpoint, then ends)."""
        try:
            self.run.stop()
        except Exception as error:  # noqa: BLE001 - e.g. a run on another machine
            slicer.util.errorDisplay(str(error))
            return
        self.ui.statusLabel.text = _("Stopping at the next safe point (saving a checkpoint)...")

    def onResume(self) -> None:
        if not self.logic.ensureDependencies():
            return
        try:
            self.follow(self.logic.trainer.resume(self.run.run_dir))
        except Exception as error:  # noqa: BLE001 - e.g. no checkpoint, named
            slicer.util.errorDisplay(_("Cannot resume: {error}").format(error=error))

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
        """Show ``run`` in the panel and follow it from the timer. A step that fails is shown
        to the user; the run is followed all the same."""
        self.run = run
        self.timer.start()
        steps = (
            (_("remembering the run in the scene"), self._rememberRun),
            (_("showing the commands for a server"), self._showServerCommands),
            (_("showing the plots"), self.showPlots),
            (_("reading the run"), self.pollRun),
        )
        for what, step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - shown; the timer keeps following
                slicer.util.errorDisplay(
                    _("While {what}: {error}").format(what=what, error=error),
                    windowTitle="MTKD",
                )

    def _rememberRun(self) -> None:
        self._parameterNode.runFolder = str(self.run.run_dir)

    def _showServerCommands(self) -> None:
        self.ui.serverCommandTextEdit.setPlainText(server_commands(self.run.run_dir))

    def showPlots(self) -> None:
        """The run's table in the table view, its charts in the two plot widgets (each
        shows a plot view node of its own, which a qMRMLPlotWidget does not create)."""
        from MTKDLib.run_plots import plot_view_node

        table, losses, validation = self.run.plots.nodes()
        self.ui.metricsTableView.setMRMLTableNode(table)
        for widget, tag, chart in (
            (self.ui.lossPlotWidget, LOSS_PLOT_VIEW, losses),
            (self.ui.dicePlotWidget, DICE_PLOT_VIEW, validation),
        ):
            widget.setMRMLScene(slicer.mrmlScene)  # no-op when the .ui connection set it
            widget.setMRMLPlotViewNode(plot_view_node(slicer.mrmlScene, tag, chart))

    def pollRun(self) -> None:
        from MTKDLib.run_monitor import format_status

        if self.run is None:
            self.timer.stop()
            return
        try:
            state = self.run.poll()
        except Exception as error:  # noqa: BLE001 - e.g. the run folder went away
            self.timer.stop()  # once, not a dialog twice a second
            slicer.util.errorDisplay(
                _("Following the run stopped: {error}. Attach follows it again.").format(
                    error=error
                ),
                windowTitle="MTKD",
            )
            return
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
                try:
                    self.recordLoopVersion()
                except Exception as error:  # noqa: BLE001 - named, the run stays shown
                    slicer.util.errorDisplay(str(error), windowTitle="MTKD")
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

    def _datasetFolder(self) -> Path | None:
        """The chosen dataset folder; None when none is chosen."""
        from MTKDLib.training_set import chosen_folder

        try:
            return chosen_folder(self._parameterNode.datasetFolder)
        except ValueError:
            return None

    def updateLoop(self) -> None:
        from MTKDLib.loop_scores import score_table

        loop = self.logic.loop(self._datasetFolder())
        current = loop.current() if loop else None
        self.ui.currentVersionLabel.text = current.name if current else _("none")
        busy = bool(self.run is not None and self.run.running) or self.scoring is not None
        busy = busy or bool(loop and loop.running_run())  # e.g. started by another Slicer
        self.ui.distillAgainButton.enabled = current is not None and not busy
        # the running run was started from the current version: keep it until the run ends
        self.ui.switchVersionButton.enabled = current is not None and not busy
        self.ui.rollbackButton.enabled = (
            current is not None and current.previous is not None and not busy
        )
        versions = loop.versions() if loop else []
        table = self.ui.versionsTableWidget
        table.clear()
        columns = [_("Version"), _("Model"), _("Cases added"), _("Test Dice (previous)"),
                   _("Gate")]  # fmt: skip
        table.setColumnCount(len(columns))
        table.setHorizontalHeaderLabels(columns)
        table.setRowCount(len(versions))
        for row, version in enumerate(versions):
            test = version.scores.get("new", {}).get("test", {})
            before = version.scores.get("previous", {}).get("test", {})
            gate = version.gate
            texts = [
                f"v{version.number}"
                + (" (current)" if current and version.key == current.key else ""),  # fmt: skip
                version.name,
                str(len(version.cases_added)),
                f"{test['mean']:.3f} ({before.get('mean', float('nan')):.3f})" if test else "",
                (_("worse, accepted") if gate.get("accepted") else _("worse"))
                if gate.get("reasons")
                else (_("passed") if gate else ""),  # fmt: skip
            ]
            for column, text in enumerate(texts):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, version.key)
                item.setToolTip("\n".join(gate.get("reasons", [])) or score_table(version.scores))
                table.setItem(row, column, item)

    def onBeginLoop(self) -> None:
        key = self.ui.loopStudentComboBox.currentData
        try:
            folder = self._datasetFolder()
            self.logic.startLoop(folder, key, self.teacherPath())
        except Exception as error:  # noqa: BLE001 - e.g. no training set there yet
            slicer.util.errorDisplay(str(error))
        else:
            rememberLoop(folder)
        self.updateGui()

    def _loop(self):
        """The loop of the chosen training set; ValueError saying what to do when none."""
        loop = self.logic.loop(self._datasetFolder())
        if loop is None:
            raise ValueError(_("choose the dataset folder and begin the loop first"))
        return loop

    def onAddCase(self) -> None:
        from MTKDLib.training_set import SceneCase

        node = self._parameterNode
        try:
            caseId = self._loop().add_case(
                SceneCase(node.correctedVolume, node.correctedSegmentation),
                patient=node.casePatient.strip() or None,
                to_test=node.caseToTest,
            )
        except Exception as error:  # noqa: BLE001 - names the missing or misnamed segment
            slicer.util.errorDisplay(_("Cannot add the case: {error}").format(error=error))
            return
        where = _("test cases") if node.caseToTest else _("training set")
        self.ui.statusLabel.text = _("Added case '{case}' to the {where}.").format(
            case=caseId, where=where
        )

    def onMarkNotAnnotated(self) -> None:
        """Ask which structure nobody drew in the corrected case, and mark it."""
        from MTKDLib.segment_labels import mark_not_annotated

        segmentation = self._parameterNode.correctedSegmentation
        try:
            trainingSet = self._loop().training_set
            structures = trainingSet.structures()
            dialog = qt.QInputDialog(slicer.util.mainWindow())
            dialog.setWindowTitle(_("Not annotated"))
            dialog.setLabelText(_("Structure nobody drew in '{case}':").format(
                case=segmentation.GetName()))  # fmt: skip
            dialog.setComboBoxItems(structures)
            dialog.setComboBoxEditable(False)
            if dialog.exec_() != qt.QDialog.Accepted:
                return
            structure = dialog.textValue()
            mark_not_annotated(segmentation, structure, structures, trainingSet.aliases())
        except Exception as error:  # noqa: BLE001 - names the structure or the ambiguity
            slicer.util.errorDisplay(_("Cannot mark it: {error}").format(error=error))
            return
        self.ui.statusLabel.text = _(
            "'{structure}' is marked not annotated in '{case}': it is left out of the loss and "
            "the scores for this case."
        ).format(structure=structure, case=segmentation.GetName())

    def onDistillAgain(self) -> None:
        try:
            options, runDir = self._loop().next_run(self.options(), self._parameterNode.runsFolder)
        except Exception as error:  # noqa: BLE001 - a bad configuration, named
            slicer.util.errorDisplay(_("Cannot start: {error}").format(error=error))
            return
        self.onStart(options, runDir)

    def recordLoopVersion(self) -> None:
        """A finished run the loop started: score it and its parent on the loop's test cases
        (``mtkd evaluate`` jobs on the engine worker), then record it (:meth:`finishRecording`)."""
        from MTKDLib.loop_scores import ScoringJob

        loop = self.logic.loop(self._datasetFolder())
        runDir = str(self.run.run_dir)
        if runDir not in loop.started_runs() or self.scoring is not None:
            return  # not the loop's run (Add to library imports it), or already recorded
        job = ScoringJob(loop.scoring_plan(runDir), worker=self.logic.worker)
        self.scoring = (loop, runDir, job)
        self.ui.statusLabel.text = _("Scoring the new and the previous version on the test cases")
        self.scoringTimer = qt.QTimer()
        self.scoringTimer.setInterval(POLL_MILLISECONDS)
        self.scoringTimer.timeout.connect(self.pollScoring)
        self.scoringTimer.start()
        self.updateGui()

    def pollScoring(self) -> None:
        loop, runDir, job = self.scoring
        if not job.poll():
            return
        self.scoringTimer.stop()
        self.scoring = None
        try:
            if job.error:
                raise RuntimeError(_("scoring failed: {error}").format(error=job.error))
            self.finishRecording(loop.record(runDir, scores=job.scores()), loop)
        except Exception as error:  # noqa: BLE001 - named, the run stays shown
            slicer.util.errorDisplay(str(error), windowTitle="MTKD")
        self.refreshLibraryChoices()
        self.updateGui()

    def finishRecording(self, recorded, loop) -> None:
        """Say what the new version scored; a worse one becomes current only when the user
        chooses it after reading why."""
        version = recorded.version
        text = _("New version {name}: test Dice {after} ({before} before).")
        self.ui.statusLabel.text = text.format(
            name=version.name,
            after=version.scores.get("new", {}).get("test", {}).get("mean"),
            before=version.scores.get("previous", {}).get("test", {}).get("mean"),
        )
        if recorded.reasons and slicer.util.confirmYesNoDisplay(
            _("{name} is worse than the version it was fine-tuned from:\n{reasons}\n\n"
              "Use it as the current version anyway?").format(
                name=version.name, reasons="\n".join(recorded.reasons)),
            windowTitle="MTKD",
        ):  # fmt: skip
            loop.switch(version.key, accept_worse=True)

    def _selectedVersion(self):
        item = self.ui.versionsTableWidget.currentItem()
        return item.data(qt.Qt.UserRole) if item else None

    def onSwitchVersion(self) -> None:
        key = self._selectedVersion()
        if key:
            self._changeVersion(lambda loop: loop.switch(key))

    def onRollback(self) -> None:
        self._changeVersion(lambda loop: loop.rollback())

    def _changeVersion(self, change) -> None:
        from MTKDLib.distill_loop import WorseVersion

        try:
            loop = self._loop()
            try:
                change(loop)
            except WorseVersion as worse:
                if slicer.util.confirmYesNoDisplay(
                    _("{reason}\n\nUse it as the current version anyway?").format(reason=worse),
                    windowTitle="MTKD",
                ):
                    loop.switch(worse.version.key, accept_worse=True)
        except Exception as error:  # noqa: BLE001 - e.g. no earlier version, named
            slicer.util.errorDisplay(str(error), windowTitle="MTKD")
        self.updateGui()


def rememberLoop(folder) -> None:
    """Name the loop in use in the application settings: MTKD Segment preselects its current
    version."""
    from MTKDLib.distill_loop import LOOP_SETTING

    qt.QSettings().setValue(LOOP_SETTING, str(folder))


class MTKDTrainLogic(ScriptedLoadableModuleLogic):
    """The module's logic for ``slicer.mrmlScene``: runs (``MTKDLib.train_logic``), the
    training set and the loop (``MTKDLib``), the model library (``mtkd.library``). Training
    runs are processes of their own; the loop scores its versions on the session's engine
    worker (shared with MTKD Segment); ``useWorker=False``: each model in a new process."""

    def __init__(self, scene=None, useWorker: bool = True) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.trainer = TrainLogic(scene or slicer.mrmlScene)
        self.worker = shared_worker() if useWorker else None
        self.libraryRoot = None  # None: the folder in the user's settings
        self.loopMargin = None  # None: the loop's default (MTKDLib.loop_scores.DEFAULT_MARGIN)

    def getParameterNode(self):
        return MTKDTrainParameterNode(super().getParameterNode())

    def library(self):
        return model_library(self.libraryRoot)

    def loop(self, datasetFolder):
        """The loop of this training set, or None where none was started (or no folder)."""
        from MTKDLib.distill_loop import LOOP_FILE, DistillLoop

        if datasetFolder is None:
            return None
        folder = Path(datasetFolder)
        if not (folder / LOOP_FILE).is_file():
            return None
        if self.loopMargin is None:
            return DistillLoop(folder, self.library())
        return DistillLoop(folder, self.library(), margin=self.loopMargin)

    def startLoop(self, datasetFolder, studentKey: str, teacher: str):
        from MTKDLib.distill_loop import DistillLoop
        from MTKDLib.training_set import chosen_folder

        return DistillLoop(chosen_folder(datasetFolder), self.library()).begin(studentKey, teacher)

    @staticmethod
    def ensureDependencies() -> bool:
        return ensure_engine_dependencies()


class MTKDTrainTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Developer mode > Reload and Test, or the module's CTest), driving the
    panel as a user does: nodes chosen in the selectors, values typed, buttons pressed, the
    status line, the plots and the result nodes read.

    - :meth:`test_panel` always runs (no torch needed): a training set exported from scene
      nodes (and refused while no folder is chosen), and a run folder followed in the plots.
    - :meth:`test_distill_in_the_background` runs when torch and MONAI are installed
      (otherwise it says so and returns): Start, Stop, Resume, Add to library, and one turn
      of the annotate-then-distill loop, with a tiny teacher trained here.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_panel()
        self.setUp()
        self.test_distill_in_the_background()

    @staticmethod
    def panel():
        slicer.util.selectModule("MTKDTrain")
        panel = slicer.modules.mtkdtrain.widgetRepresentation().self()
        panel.cases.clear()
        panel.showCases()
        return panel

    def choosePath(self, pathLineEdit, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        pathLineEdit.currentPath = str(folder)
        self.assertEqual(Path(pathLineEdit.currentPath), folder)

    @staticmethod
    def syntheticCase():
        """A small volume and a segmentation with one segment, "liver"."""
        import numpy as np

        array = np.full((8, 32, 32), -100, dtype=np.int16)
        array[2:6, 8:24, 8:24] = 60
        volume = slicer.util.addVolumeFromArray(array, name="self-test CT")
        labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "self-test labels")
        labels.CreateDefaultDisplayNodes()
        labels.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = labels.GetSegmentation().AddEmptySegment("liver", "liver")
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            (array > 0).astype(np.uint8), labels, segmentId, volume
        )
        return volume, labels

    def test_panel(self):
        import json

        panel = self.panel()
        ui = panel.ui
        work = Path(tempfile.mkdtemp(prefix="mtkd-selftest-"))

        self.delayDisplay("A training set from the scene; refused while no folder is chosen")
        volume, labels = self.syntheticCase()
        ui.caseVolumeSelector.setCurrentNode(volume)
        ui.caseSegmentationSelector.setCurrentNode(labels)
        self.assertTrue(ui.addPairButton.enabled)
        ui.addPairButton.click()
        self.assertEqual(ui.casesTableWidget.rowCount, 1)
        self.assertIn("liver", ui.datasetSummaryLabel.text)
        panel._parameterNode.datasetFolder = Path()  # nothing chosen: what an empty field reads
        inWorkingFolder = Path("dataset.json").exists()
        ui.exportButton.click()
        self.assertIn("choose the dataset folder", ui.datasetSummaryLabel.text)
        self.assertEqual(Path("dataset.json").exists(), inWorkingFolder)
        self.choosePath(ui.datasetPathLineEdit, work / "dataset")
        self.assertEqual(Path(panel._parameterNode.datasetFolder), work / "dataset")
        ui.exportButton.click()
        self.assertTrue((work / "dataset" / "dataset.json").is_file(), ui.datasetSummaryLabel.text)
        self.assertIn("Exported 1 cases", ui.datasetSummaryLabel.text)

        self.delayDisplay("A run folder followed: status line, table and plots")
        from mtkd.run_folder import RunDir

        run = work / "runs" / "followed"
        run.mkdir(parents=True)
        model = str(RunDir(run).model)
        events = [
            {"type": "status", "state": "preparing", "kind": "distill", "time": 1.0},
            {"type": "status", "state": "training", "epochs": 2, "start_epoch": 0, "time": 2.0},
            {"type": "metrics", "epoch": 1, "epochs": 2, "loss": 1.0, "val_dice": 0.5},
            {"type": "metrics", "epoch": 2, "epochs": 2, "loss": 0.5, "val_dice": 0.7},
            {"type": "done", "model": model, "best_val_dice": 0.7, "best_epoch": 2},
        ]
        RunDir(run).events.write_text("".join(json.dumps(e) + "\n" for e in events))
        classes = ("vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode",
                   "vtkMRMLPlotViewNode")  # fmt: skip
        counts = []
        for _attach in range(2):  # Attach (after its folder dialog), then Attach again
            panel.follow(panel.logic.trainer.attach(run))
            table, losses, validation = panel.run.plots.nodes()
            self.assertTrue(ui.statusLabel.text.startswith("finished"), ui.statusLabel.text)
            self.assertEqual(ui.progressBar.value, 100)
            self.assertEqual(ui.metricsTableView.mrmlTableNode().GetID(), table.GetID())
            self.assertEqual(table.GetNumberOfRows(), 2)
            lossView = ui.lossPlotWidget.mrmlPlotViewNode()
            self.assertEqual(lossView.GetPlotChartNodeID(), losses.GetID())
            diceView = ui.dicePlotWidget.mrmlPlotViewNode()
            self.assertEqual(diceView.GetPlotChartNodeID(), validation.GetID())
            self.assertEqual(lossView.GetSingletonTag(), LOSS_PLOT_VIEW)
            self.assertEqual(diceView.GetSingletonTag(), DICE_PLOT_VIEW)
            self.assertFalse(panel.timer.isActive())  # an ended run is not polled
            counts.append([slicer.mrmlScene.GetNumberOfNodesByClass(name) for name in classes])
        self.assertEqual(counts[0], counts[1])  # attached again: no node added
        self.assertEqual(counts[0][:3], [1, 2, 2])  # a table, two charts, loss and val_dice
        self.delayDisplay("MTKD Train panel test passed")

    def test_distill_in_the_background(self):
        from MTKDLib.mrml_io import load_segmentation

        panel = self.panel()
        ui = panel.ui

        def restore():  # after the user's library is back
            panel.logic.loopMargin = None
            panel.refreshLibraryChoices()

        with demo_scene(
            panel.logic, "Distillation test", self.delayDisplay, ["teacher"], restore
        ) as demo:
            if demo is None:
                return
            work, volume, teacher = demo.work, demo.volume, demo.models["teacher"]
            panel.refreshLibraryChoices()  # as entering the module does
            labels = load_segmentation(
                slicer.mrmlScene, work / "demo" / "abdomen_student.seg.nrrd", "labels", volume
            )

            self.delayDisplay("Building the training set from the scene")
            ui.caseVolumeSelector.setCurrentNode(volume)
            ui.caseSegmentationSelector.setCurrentNode(labels)
            for _copy in range(5):
                ui.addPairButton.click()
            self.choosePath(ui.datasetPathLineEdit, work / "dataset")
            ui.exportButton.click()
            self.assertTrue((work / "dataset" / "dataset.json").is_file(),
                            ui.datasetSummaryLabel.text)  # fmt: skip

            self.delayDisplay("Distilling in the background: Start, Stop, Resume")
            choose_item(ui.teacherModelComboBox, teacher.key)
            ui.epochsSpinBox.value = 30
            ui.studentFractionSpinBox.value = 1.0
            choose_item(ui.deviceComboBox, "cpu")
            ui.runNameLineEdit.text = "student"
            self.choosePath(ui.runsFolderPathLineEdit, work / "runs")
            self.assertEqual(Path(panel._parameterNode.runsFolder), work / "runs")
            self.assertTrue(ui.startButton.enabled)
            ui.startButton.click()
            self.assertIsNotNone(panel.run, ui.statusLabel.text)

            def run_state():
                return panel.run.state

            process_events_until(
                lambda: run_state().epoch >= 1 or run_state().ended, 1800, "the first epoch"
            )
            self.assertTrue(ui.stopButton.enabled)
            ui.stopButton.click()
            process_events_until(lambda: run_state().ended and not panel.run.running, 600, "Stop")
            self.assertEqual(run_state().state, "interrupted", ui.statusLabel.text)
            self.assertTrue(ui.statusLabel.text.startswith("stopped at epoch"))
            self.assertTrue(ui.resumeButton.enabled)
            ui.resumeButton.click()
            process_events_until(
                lambda: run_state().state == "finished" and not panel.run.running, 1800, "Resume"
            )
            self.assertTrue(ui.statusLabel.text.startswith("finished"), ui.statusLabel.text)
            table, losses, _validation = panel.run.plots.nodes()
            self.assertEqual(table.GetNumberOfRows(), 30)
            self.assertEqual(ui.metricsTableView.mrmlTableNode().GetID(), table.GetID())
            lossView = ui.lossPlotWidget.mrmlPlotViewNode()
            self.assertEqual(lossView.GetPlotChartNodeID(), losses.GetID())

            self.assertTrue(ui.addToLibraryButton.enabled)
            ui.addToLibraryButton.click()
            (student,) = [e for e in panel.logic.library().entries() if e.key != teacher.key]
            self.assertIn(student.name, ui.statusLabel.text)

            self.delayDisplay("One turn of the annotate-then-distill loop")
            choose_item(ui.loopStudentComboBox, student.key)
            ui.beginLoopButton.click()
            self.assertEqual(ui.currentVersionLabel.text, student.name)
            ui.correctedVolumeSelector.setCurrentNode(volume)
            ui.correctedSegmentationSelector.setCurrentNode(labels)
            ui.addCaseButton.click()
            self.assertIn("Added case", ui.statusLabel.text)
            ui.epochsSpinBox.value = 3
            panel.logic.loopMargin = 1.0  # any tiny version passes the gate: no question asked
            self.assertTrue(ui.distillAgainButton.enabled)
            ui.distillAgainButton.click()
            self.assertFalse(ui.switchVersionButton.enabled)  # while the loop's run goes
            process_events_until(
                lambda: run_state().state == "finished" and not panel.run.running,
                1800,
                "Distill again",
            )
            process_events_until(lambda: panel.scoring is None, 600, "scoring the versions")
            self.assertTrue(ui.statusLabel.text.startswith("New version"), ui.statusLabel.text)
            self.assertEqual(ui.versionsTableWidget.rowCount, 2)
        self.delayDisplay("MTKD Train test passed")
