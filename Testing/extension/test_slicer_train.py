"""MTKDTrain's logic against real MRML (``slicer-core``) and real background runs: a training
set exported from scene nodes, the configuration panel's config, a distillation started,
stopped (checkpoint kept), resumed and re-attached, and the annotate-then-distill loop, its
versions scored on the engine worker (``mtkd serve``) as by one ``mtkd evaluate`` process per
model."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from helpers import untrained_model
from slicer_scene import new_scene, scene_cases, write_slab_cases

from mtkd.config import RECOMMENDED_PRESET, RunConfig, load_config
from mtkd.data.datasets import load_dataset
from mtkd.distill.presets import resolve_output_term
from mtkd.engine.teacher_targets import ONLINE, PRECOMPUTED, teacher_targets
from mtkd.library import ModelLibrary
from mtkd.modelfiles.model_io import load_model
from mtkd.run_folder import read_events
from MTKDLib.distill_loop import DistillLoop, WorseVersion
from MTKDLib.loop_scores import ScoringJob, score_versions
from MTKDLib.mrml_io import labelmap_array
from MTKDLib.train_config import (
    TrainingOptions,
    build_config,
    server_commands,
    write_config,
)
from MTKDLib.train_logic import TrainLogic
from MTKDLib.training_set import (
    SceneCase,
    TrainingSet,
    dataset_summary,
    export_training_set,
    plan_labels,
)
from MTKDLib.worker import EngineWorker

PYTHON = sys.executable
STRUCTURES = ["liver", "spleen", "kidney_right"]
SLABS = 6  # cases cut from the real CT along z


@pytest.fixture(scope="module")
def case_files(data_dir, tmp_path_factory):
    """Six 6-slice slabs of the real abdomen CT (NRRD) with their labels as ``.seg.nrrd``
    (the structures the tiny teacher knows, named as TotalSegmentator names them); slices
    70..105 hold the three structures."""
    starts = [70 + 6 * index for index in range(SLABS)]
    return write_slab_cases(data_dir, tmp_path_factory.mktemp("slabs"), starts, STRUCTURES)


def rename(case: SceneCase, old: str, new: str) -> None:
    segmentation = case.segmentation.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(old)).SetName(new)


def test_training_set_from_scene_nodes_has_one_label_table(case_files, tmp_path):
    scene, _ = new_scene()
    cases = scene_cases(scene, case_files[:3])
    rename(cases[1], "liver", "Liver")  # same structure, other spelling: matched
    folder = tmp_path / "dataset"
    export_training_set(cases, folder, added_by="dr-test")

    dataset = load_dataset(folder)  # what the engine reads
    assert dataset.layout == "msd"
    assert dataset.labels.names == STRUCTURES
    assert [case.case_id for case in dataset.cases] == ["slab0", "slab1", "slab2"]
    for case, scene_case in zip(dataset.cases, cases, strict=True):
        written = sitk.ReadImage(str(case.label))
        expected = labelmap_array(scene_case.segmentation, scene_case.volume)
        assert np.array_equal(sitk.GetArrayFromImage(written), expected)
        source = sitk.ReadImage(str(case_files[int(case.case_id[-1])][0]))
        image = sitk.ReadImage(str(case.image))
        assert np.allclose(image.GetOrigin(), source.GetOrigin(), atol=1e-4)
        assert np.allclose(image.GetDirection(), source.GetDirection(), atol=1e-6)
        assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))
    records = TrainingSet(folder).records()
    assert [r["added_by"] for r in records] == ["dr-test"] * 3
    summary = dataset_summary(folder)
    assert summary == "msd dataset: 3 cases (3 labelled); structures: liver, spleen, kidney_right"
    assert "not a dataset" in dataset_summary(tmp_path) and str(tmp_path) in dataset_summary(
        tmp_path
    )
    assert all(r["added_at"] for r in records)


def test_cases_that_disagree_are_reported_and_nothing_is_written(case_files, tmp_path):
    scene, _ = new_scene()
    cases = scene_cases(scene, case_files[:3])
    rename(cases[1], "spleen", "splen")  # a typo, and no terminology code to match it by
    segmentation = cases[1].segmentation.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("splen")).RemoveTag(
        "TerminologyEntry"
    )
    segmentation = cases[2].segmentation.GetSegmentation()
    segmentation.RemoveSegment(segmentation.GetSegmentIdBySegmentName("kidney_right"))
    plan = plan_labels(cases, STRUCTURES)
    assert plan.missing == {"slab1": ["spleen"], "slab2": ["kidney_right"]}
    assert any("'splen'" in line and "'spleen'" in line for line in plan.renamed)
    assert plan.common == ["liver"]
    folder = tmp_path / "dataset"
    with pytest.raises(ValueError) as info:
        export_training_set(cases, folder, STRUCTURES)
    message = str(info.value)
    assert "slab2" in message and "kidney_right" in message and "splen" in message
    assert not folder.exists()
    export_training_set(cases, folder, plan.common)  # what every case has
    assert load_dataset(folder).labels.names == ["liver"]


def test_export_without_a_chosen_folder_is_refused(case_files, tmp_path, monkeypatch):
    """An empty dataset path field reads as Path("") == Path("."): Export must refuse it (and
    a relative path) instead of writing into the application's working directory."""
    scene, _ = new_scene()
    cases = scene_cases(scene, case_files[:1])
    monkeypatch.chdir(tmp_path)
    for folder in ("", ".", Path(""), Path("."), None, "dataset"):
        with pytest.raises(ValueError, match="choose"):
            export_training_set(cases, folder)
    assert list(tmp_path.iterdir()) == []  # nothing written in the working directory
    export_training_set(cases, tmp_path / "dataset")
    assert (tmp_path / "dataset" / "dataset.json").is_file()


def test_panel_options_become_a_valid_config(teacher_run, tmp_path):
    options = TrainingOptions(dataset=str(tmp_path), teacher=str(teacher_run), name="s1",
                              taps="all_scales", feature_loss="mse",
                              scale_weights={"B-B": 0.3}, output_loss="cwd",
                              output_weight=0.2, output_temperature=4.0, use_unlabelled=False,
                              epochs=7, student_fraction=0.5)  # fmt: skip
    config = build_config(options)
    prep = load_model(teacher_run).prep
    assert config["data"]["slice_size"] == list(prep.slice_size)
    assert config["data"]["hu_window"] == list(prep.hu_window)
    assert config["data"]["structures"] == load_model(teacher_run).labels.names
    assert config["distill"]["preset"] == "all_scales"
    assert config["distill"]["feature_loss"] == "mse"
    assert config["distill"]["output"] == {"loss": "cwd", "weight": 0.2, "temperature": 4.0}
    assert config["distill"]["unlabelled"] == "none"
    assert config["distill"]["teacher_targets"] == "online"  # the engine's default
    assert config["split"]["student_fraction"] == 0.5 and config["train"]["epochs"] == 7
    assert RunConfig.from_dict(config).distill.scale_weights == {"B-B": 0.3}

    custom = build_config(
        TrainingOptions(
            dataset=str(tmp_path),
            teacher=str(teacher_run),
            taps=None,
            custom_pairs=[("enc.1", "backbone.enc.1")],
        )  # fmt: skip
    )
    assert custom["distill"]["pairs"][0]["student"] == "enc.1"
    with pytest.raises(ValueError, match="custom tap pairs"):
        build_config(TrainingOptions(dataset="d", teacher=str(teacher_run), taps=None))
    with pytest.raises(ValueError, match="distill"):
        build_config(TrainingOptions(dataset="d", teacher=str(teacher_run), taps="none",
                                     output_loss="none"))  # fmt: skip
    with pytest.raises(ValueError, match="not an MTKD run"):
        build_config(TrainingOptions(dataset="d", teacher=str(tmp_path)))

    run = tmp_path / "run"
    path = write_config(options, run)
    # written as a run writes it: paths relative to the run folder, read back absolute
    written = yaml.safe_load(path.read_text())
    assert written["data"]["source"] == os.path.relpath(tmp_path.resolve(), run.resolve())
    assert written["absolute_paths"]["distill.teacher"] == str(teacher_run.resolve())
    expected = RunConfig.from_dict(config).with_absolute_paths()
    assert load_config(path).to_dict() == expected.to_dict()
    commands = server_commands(run)
    assert f"mtkd distill {run / 'config.yaml'} --run-dir {run}" in commands
    assert f"mtkd distill --resume {run}" in commands
    assert f"torchrun --standalone --nproc_per_node N -m mtkd distill --resume {run}" in commands


def test_the_panel_opens_on_the_recommended_recipe(teacher_run, tmp_path):
    """The panel's defaults and the engine's recommended preset are one recipe: the same terms,
    and the unlabelled training cases used."""
    panel = RunConfig.from_dict(build_config(TrainingOptions(str(tmp_path), str(teacher_run))))
    engine = RunConfig.from_dict({**build_config(TrainingOptions(str(tmp_path), str(teacher_run))),
                                  "distill": {"teacher": str(teacher_run)}})  # fmt: skip
    assert engine.distill.preset == RECOMMENDED_PRESET
    panel_output = resolve_output_term(panel.distill)
    engine_output = resolve_output_term(engine.distill)
    assert (panel_output.loss, panel_output.weight, panel_output.temperature) == (
        engine_output.loss, engine_output.weight, engine_output.temperature)  # fmt: skip
    assert (panel_output.loss, panel_output.weight, panel_output.temperature) == ("pmd", 1, 1)
    assert panel.distill.pairs == [] and panel.distill.preset is None
    assert panel.unlabelled_images() == engine.unlabelled_images() == "train"
    assert panel.distill.teacher_targets == engine.distill.teacher_targets == "online"


def test_the_panel_can_ask_for_teacher_targets_computed_once(teacher_run, tmp_path):
    """The checkbox asks for ``teacher_targets: auto``: computed once with the output term
    alone, online where feature terms weigh (not refused)."""
    options = TrainingOptions(str(tmp_path), str(teacher_run), precompute_teacher=True)
    config = RunConfig.from_dict(build_config(options))
    assert config.distill.teacher_targets == "auto"
    assert teacher_targets(config.distill, stored_teacher=False) == PRECOMPUTED
    thesis = TrainingOptions(str(tmp_path), str(teacher_run), taps="thesis",
                             precompute_teacher=True)  # fmt: skip
    assert teacher_targets(RunConfig.from_dict(build_config(thesis)).distill, False) == ONLINE


def wait_for(run, condition, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = run.poll()
        if condition(state):
            return state
        assert not (state.ended and not condition(state)), (state.state, state.error, state.log)
        time.sleep(0.1)
    raise AssertionError(f"timed out; last state {run.state.state}: {run.state.log[-5:]}")


@pytest.fixture(scope="module")
def training_set(case_files, tmp_path_factory):
    """The first five slabs, exported from scene nodes (the sixth is the loop's new case)."""
    scene, _ = new_scene()
    folder = tmp_path_factory.mktemp("set") / "dataset"
    export_training_set(scene_cases(scene, case_files[:5]), folder)
    return folder


def tiny_options(training_set, teacher_run, **changes) -> TrainingOptions:
    values = dict(dataset=str(training_set), teacher=str(teacher_run), name="student",
                  student="thesis_s1", epochs=2, batch_size=4, learning_rate=1e-2,
                  student_fraction=1.0, device="cpu")  # fmt: skip
    values.update(changes)
    return TrainingOptions(**values)


@pytest.fixture(scope="module")
def stopped_and_resumed(training_set, teacher_run, tmp_path_factory):
    """A run stopped after its first epoch (SIGTERM: checkpoint) and then resumed to the end;
    the states seen along the way."""
    scene, _ = new_scene()
    logic = TrainLogic(scene, python=PYTHON)
    run_dir = tmp_path_factory.mktemp("runs") / "student"
    options = tiny_options(training_set, teacher_run, epochs=40)
    run = logic.start(options, run_dir)
    first = wait_for(run, lambda s: s.epoch >= 1)
    run.stop()
    stopped = wait_for(run, lambda s: s.ended)
    stopped_run = run.process.wait(60)
    checkpoint = (run_dir / "checkpoints" / "last.pt").is_file()
    resumed = logic.resume(run_dir)
    finished = wait_for(resumed, lambda s: s.state == "finished", timeout=600)
    return {"dir": run_dir, "first": first, "stopped": stopped, "code": stopped_run,
            "checkpoint": checkpoint, "finished": finished, "scene": scene,
            "plots": resumed.plots}  # fmt: skip


def test_stop_keeps_the_checkpoint_and_resume_continues(stopped_and_resumed):
    result = stopped_and_resumed
    stopped, finished = result["stopped"], result["finished"]
    assert result["first"].state == "training" and result["first"].pid
    assert stopped.state == "interrupted" and result["checkpoint"]
    assert result["code"] == 130  # the engine's exit status for a stop request
    assert 1 <= stopped.epoch < 40
    events = read_events(result["dir"] / "events.jsonl")
    resumed_from = [e for e in events if e.get("state") == "training"][-1]["start_epoch"]
    assert resumed_from == stopped.epoch  # continued from the checkpoint's epoch
    epochs = [e["epoch"] for e in events if e["type"] == "metrics"]
    assert epochs == list(range(1, 41))  # each epoch exactly once across stop and resume
    assert finished.epoch == 40 and finished.model
    assert (result["dir"] / "model" / "mtkd_model.json").is_file()


def test_training_curves_become_table_and_plot_nodes(stopped_and_resumed):
    table, losses, validation = stopped_and_resumed["plots"].nodes()
    events = read_events(stopped_and_resumed["dir"] / "events.jsonl")
    metrics = [e for e in events if e["type"] == "metrics"]
    assert table.GetNumberOfRows() == len(metrics) == 40  # the whole run, across the stop
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    loss = table.GetTable().GetColumn(columns.index("loss"))
    assert [loss.GetValue(r) for r in range(40)] == pytest.approx([m["loss"] for m in metrics])
    assert losses.GetNumberOfPlotSeriesNodes() >= 2 and validation.GetNumberOfPlotSeriesNodes()


def test_reattach_to_a_finished_run(stopped_and_resumed):
    scene, _ = new_scene()
    run = TrainLogic(scene, python=PYTHON).attach(stopped_and_resumed["dir"])
    state = run.poll()
    assert state.state == "finished" and state.epoch == 40
    assert len(state.history) == 40 and state.best_val_dice is not None
    assert run.running is False  # its process has ended
    table, _, _ = run.plots.nodes()
    assert table.GetNumberOfRows() == 40

    # Attach again (twice): the same table, charts and series, nothing added
    classes = ("vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode")
    counts = [scene.GetNumberOfNodesByClass(name) for name in classes]
    for _ in range(2):
        again = TrainLogic(scene, python=PYTHON).attach(stopped_and_resumed["dir"])
        again.poll()
        assert [scene.GetNumberOfNodesByClass(name) for name in classes] == counts
        assert again.plots.table is table and again.plots.table.GetNumberOfRows() == 40
    # the run's start and its resume, in one scene, shared one table and two charts
    started_in = stopped_and_resumed["scene"]
    assert [started_in.GetNumberOfNodesByClass(name) for name in classes[:2]] == [1, 2]


def test_a_crashing_run_shows_its_error(training_set, teacher_run, tmp_path):
    broken = tmp_path / "not-a-dataset"
    broken.mkdir()
    run = TrainLogic(None, python=PYTHON).start(tiny_options(broken, teacher_run), tmp_path / "run")
    state = wait_for(run, lambda s: s.state == "failed", timeout=120)
    assert state.error and str(broken) in state.error


@pytest.fixture(scope="module")
def worker():
    """The engine worker (``mtkd serve``) that scores the loop's versions, as in Slicer."""
    engine = EngineWorker(python=PYTHON)
    yield engine
    engine.stop()


def same(scores: dict, others: dict) -> bool:
    """Equal scores, NaN (a structure in no case of a group) equal to NaN."""
    return json.dumps(scores, sort_keys=True) == json.dumps(others, sort_keys=True)


def scored(job: ScoringJob, timeout: float = 300) -> ScoringJob:
    """``job`` once it has ended (polled as the panel's timer polls it)."""
    deadline = time.monotonic() + timeout
    while not job.poll():
        assert time.monotonic() < deadline, "scoring timed out"
        time.sleep(0.1)
    return job


@pytest.fixture(scope="module")
def scoring_plan(training_set, teacher_run, tmp_path_factory) -> dict:
    """A loop's scoring plan (as :meth:`DistillLoop.scoring_plan` gives it) for two versions:
    the tiny trained teacher and a tiny untrained model."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = untrained_model(tmp_path_factory.mktemp("version") / "v1", tuple(STRUCTURES))
    models = {"new": str(teacher_run), "previous": str(untrained)}
    groups = {"test": ["slab0", "slab3"], "test_old": ["slab0"], "test_new": ["slab3"]}
    return {"dataset": str(training_set), "models": models, "groups": groups, "device": "cpu"}


def test_loop_scores_on_the_worker_are_those_of_one_process_per_model(scoring_plan, worker):
    plan = scoring_plan
    by_process = scored(ScoringJob(plan, python=PYTHON))
    on_worker = scored(ScoringJob(plan, worker=worker))
    assert by_process.error is None and on_worker.error is None, (by_process.error, on_worker.error)
    scores = on_worker.scores()
    assert same(scores, by_process.scores())  # the same CSVs, read the same way
    here = score_versions(Path(plan["dataset"]), plan["models"], plan["groups"], "cpu")
    for model in ("new", "previous"):
        assert set(scores[model]) == {"test", "test_old", "test_new"}
        assert set(scores[model]["test"]) == {*STRUCTURES, "mean"}
        for group, values in scores[model].items():  # the CSV keeps three decimals
            assert values == pytest.approx(here[model][group], abs=6e-4, nan_ok=True)
    assert scores["new"]["test"]["mean"] > 0  # the trained teacher finds some of them
    assert on_worker.process.reply["models_loaded"] == 1  # the second model, loaded once

    again = scored(ScoringJob(plan, worker=worker))  # the next version's scoring: models kept
    assert again.error is None and same(again.scores(), scores)
    assert (again.process.reply["models_loaded"], again.process.reply["models_reused"]) == (0, 1)
    assert worker.starts == 1 and again.process.worker_pid == on_worker.process.worker_pid


@pytest.mark.parametrize("on_worker", [False, True], ids=["processes", "worker"])
def test_failed_and_cancelled_scoring_say_so_on_both_paths(scoring_plan, worker, on_worker,
                                                           tmp_path):  # fmt: skip
    def job(plan):
        return ScoringJob(plan, worker=worker) if on_worker else ScoringJob(plan, python=PYTHON)

    missing = tmp_path / "no-such-model"
    failed = scored(job({**scoring_plan, "models": {"new": str(missing)}}))
    assert failed.error.splitlines()[-1] == f"mtkd: error: {missing}: model not found"

    cancelled = job(scoring_plan)
    cancelled.cancel()  # returns at once
    assert cancelled.poll() and cancelled.error == "cancelled" and cancelled.waiting == []
    returncode = cancelled.process.wait(300)
    assert returncode is not None and returncode != 0
    if on_worker:
        assert returncode == 130 and worker.pid is not None  # the job stopped, the worker stays
    assert scored(job(scoring_plan)).error is None  # the next scoring runs


def test_a_worker_that_dies_fails_the_scoring_with_its_reason(scoring_plan):
    engine = EngineWorker(python=PYTHON)
    try:
        job = ScoringJob(scoring_plan, worker=engine)
        engine.kill()  # as a crash would, long before the first model is scored
        assert (
            "the MTKD engine worker stopped (exit code -9, SIGKILL); it will be restarted for "
            "the next job"
        ) in scored(job).error.splitlines()
    finally:
        engine.stop()


def test_annotate_then_distill_loop(stopped_and_resumed, training_set, teacher_run,
                                    case_files, worker, tmp_path):  # fmt: skip

    library = ModelLibrary(tmp_path / "library")
    first = library.import_model(stopped_and_resumed["dir"], name="abdomen student")
    loop_set = tmp_path / "loop-set"
    shutil.copytree(training_set, loop_set)  # the loop grows its own copy of the set
    # a margin below zero: the new version must beat its parent by more than Dice 1 (it
    # cannot), so the gate stops it whatever the tiny runs learn
    loop = DistillLoop(loop_set, library, margin=-1.0)
    loop.begin(first.key, teacher_run)
    pinned = loop.split()
    assert len(pinned.val) == len(pinned.test) == 1 and len(pinned.train) == 3

    # 3. a corrected case is added, with who and when
    scene, _ = new_scene()
    (new_case,) = scene_cases(scene, case_files[5:6])
    case_id = loop.add_case(new_case, added_by="dr-test")
    record = loop.training_set.records()[-1]
    assert record["case"] == case_id and record["added_by"] == "dr-test"
    assert "abdomen student" in record["note"]

    # 4. distill again: fine-tuned from the current version, on every training case
    options, run_dir = loop.next_run(tiny_options(training_set, teacher_run), tmp_path / "runs")
    assert options.init_from == str(library.path_of(first.key))
    assert options.dataset == str(loop_set) and options.name == "abdomen student v2"
    run = TrainLogic(None, python=PYTHON).start(options, run_dir)
    (late_case,) = scene_cases(scene, case_files[4:5])
    late = loop.add_case(late_case)  # while the run goes: credited to the next version
    wait_for(run, lambda s: s.state == "finished", timeout=600)
    split = json.loads((run_dir / "split.json").read_text())
    assert split["student_train"] == sorted(pinned.train + [case_id])
    assert (split["val"], split["test"]) == (pinned.val, pinned.test)

    # 5. the new version in the library, scored with its parent on the same test cases; the
    # gate keeps it from becoming current until the user chooses it
    plan = loop.scoring_plan(run_dir)
    job = scored(ScoringJob(plan, worker=worker))  # as the panel scores: on the engine worker
    assert job.error is None, job.error
    scores = job.scores()
    here = score_versions(Path(plan["dataset"]), plan["models"], plan["groups"], "cpu")
    for model in ("new", "previous"):
        # the CSV keeps three decimals
        assert scores[model]["test"] == pytest.approx(here[model]["test"], abs=6e-4, nan_ok=True)
    recorded = loop.record(run_dir, scores=scores)
    version = recorded.version
    assert version.number == 2 and version.previous == first.key
    assert version.cases_added == [case_id] and late not in version.cases
    assert version.val_dice_before is not None and version.val_dice_after is not None
    assert not recorded.current and recorded.reasons and loop.current().key == first.key
    assert any("mean Dice" in reason for reason in recorded.reasons)
    for model in ("new", "previous"):
        test_scores = version.scores[model]["test"]
        assert set(test_scores) == {"liver", "spleen", "kidney_right", "mean"}
    assert set(version.scores["new"]) == {"test", "test_old"}  # no test case added since v1
    assert version.sha256 == library.get(version.key).sha256
    entry = library.get(version.key)
    assert entry.history["previous"] == first.key
    assert entry.history["cases_added"] == [case_id]
    with pytest.raises(WorseVersion, match="mean Dice"):
        loop.switch(version.key)
    assert loop.switch(version.key, accept_worse=True).key == version.key
    assert loop.current().key == version.key and loop.version(version.key).gate["accepted"]
    assert loop.rollback().key == first.key and loop.current().key == first.key
    assert loop.switch(version.key).key == version.key  # accepted once: no second question
    assert loop.record(run_dir).version.key == version.key  # recorded once
    assert len(library.entries()) == 2
    metadata = json.loads((Path(entry.path) / "mtkd_model.json").read_text())
    assert metadata["lineage"]["previous"]["path"] == str(library.path_of(first.key).resolve())
