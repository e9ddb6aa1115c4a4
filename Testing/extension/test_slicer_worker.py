"""MTKD Segment's logics on the engine worker (``MTKDLib.worker``, a real ``mtkd serve``
process) against real MRML (``slicer-core``): the same segmentation node and comparison as the
one-process path, the model kept between Applies, Cancel and a bad model leave the worker
running, a worker that died fails its job clearly and the next job starts a new one, and a
module cleaned up leaves the other module's job running. (MTKD Train's loop scoring on the
worker: ``test_slicer_train.py``.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import untrained_model
from slicer_scene import load_volume, new_scene

from MTKDLib.compare_logic import CompareLogic
from MTKDLib.mrml_io import labelmap_array, segment_names
from MTKDLib.segment_logic import SegmentLogic
from MTKDLib.worker import EngineWorker, shared_worker, stopped_message

PYTHON = sys.executable  # the engine runs in this interpreter, as PythonSlicer would
WAIT = 600  # seconds: only so that a broken worker fails the test instead of hanging
STRUCTURES = ("liver", "spleen", "kidney_right")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny untrained model whose random weights (seed 0) label part of the CT."""
    return untrained_model(tmp_path_factory.mktemp("model") / "tiny", STRUCTURES, seed=0)


@pytest.fixture(scope="module")
def ct_file(data_dir, tmp_path_factory) -> Path:
    """The bundled abdomen CT with an oblique direction (rotated about the axial axis)."""
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    a = np.deg2rad(25.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    image.SetDirection((rz @ np.array(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    path = tmp_path_factory.mktemp("ct") / "ct.nrrd"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def worker():
    """One worker for the module, as Slicer keeps one for its session."""
    engine = EngineWorker(python=PYTHON)
    yield engine
    engine.stop()


@pytest.fixture
def scene_with_ct(ct_file):
    scene, _ = new_scene()
    return scene, load_volume(scene, ct_file, "Abdomen CT")


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT} s"
        time.sleep(0.02)


def start_and_see_it_run(logic, volume, model):
    """Start segmenting and return the task once its first output line has arrived."""
    task = logic.start(volume, model, "cpu")
    lines = []
    wait_for(lambda: lines.extend(task.poll().new_lines) or lines or task.state.finished, "a line")
    assert not task.state.finished, task.state.error
    return task


def test_the_worker_gives_the_segmentation_node_of_the_process_path(worker, model, scene_with_ct):
    scene, volume = scene_with_ct
    by_process = SegmentLogic(scene, python=PYTHON).segment(volume, model, "cpu")
    logic = SegmentLogic(scene, worker=worker)
    first = logic.start(volume, model, "cpu")
    first.wait(timeout=WAIT)
    second = logic.start(volume, model, "cpu")
    node = second.wait(timeout=WAIT)

    assert first.process.reply["models_loaded"] == 1
    assert (second.process.reply["models_loaded"], second.process.reply["models_reused"]) == (0, 1)
    assert first.process.worker_pid == second.process.worker_pid == worker.pid
    assert node.GetName() == by_process.GetName() == f"Abdomen CT {model.name}"
    assert segment_names(node) == segment_names(by_process) == list(STRUCTURES)
    expected = labelmap_array(by_process, volume)
    assert len(np.unique(expected)) > 1  # the model labels something
    assert np.array_equal(labelmap_array(node, volume), expected)  # voxel for voxel
    assert np.array_equal(labelmap_array(first.result, volume), expected)
    assert not first.workdir.exists() and not second.workdir.exists()  # scratch files removed
    hierarchy = scene.GetSubjectHierarchyNode()
    parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node))
    assert parent == hierarchy.GetItemByDataNode(volume)


def table_values(node) -> list[list[str]]:
    table = node.GetTable()
    return [
        [table.GetValue(r, c).ToString() for c in range(table.GetNumberOfColumns())]
        for r in range(table.GetNumberOfRows())
    ]


def test_compare_on_the_worker_matches_the_process_path(worker, model, scene_with_ct):
    scene, volume = scene_with_ct
    by_process = CompareLogic(scene, python=PYTHON).compare(volume, model, model, device="cpu")
    nodes = CompareLogic(scene, worker=worker).compare(volume, model, model, device="cpu")
    assert table_values(nodes.structures) == table_values(by_process.structures)
    assert [row[:2] for row in table_values(nodes.models)] == [
        row[:2] for row in table_values(by_process.models)
    ]  # role and model (the times differ)
    for mine, theirs in ((nodes.student, by_process.student), (nodes.teacher, by_process.teacher)):
        assert np.array_equal(labelmap_array(mine, volume), labelmap_array(theirs, volume))


def test_cancel_leaves_the_scene_and_the_worker(worker, model, scene_with_ct):
    scene, volume = scene_with_ct
    logic = SegmentLogic(scene, worker=worker)
    logic.segment(volume, model, "cpu")  # the worker is up
    pid, before = worker.pid, scene.GetNumberOfNodes()
    task = start_and_see_it_run(logic, volume, model)
    task.cancel()  # returns at once; the job stops at its next stage
    assert task.state.cancelled and task.state.finished and task.result is None
    wait_for(lambda: task.process.returncode is not None and not task.workdir.exists(), "end")
    assert task.process.returncode == 130 and task.process.reply["cancelled"] is True
    assert scene.GetNumberOfNodes() == before

    node = logic.segment(volume, model, "cpu")  # the next Apply, on the same worker
    assert worker.pid == pid and node.IsA("vtkMRMLSegmentationNode")


def test_a_bad_model_fails_clearly_and_the_worker_stays(worker, scene_with_ct, tmp_path):
    scene, volume = scene_with_ct
    before = scene.GetNumberOfNodes()
    missing = tmp_path / "no-such-model"
    task = SegmentLogic(scene, worker=worker).start(volume, missing, "cpu")
    with pytest.raises(RuntimeError) as info:
        task.wait(timeout=WAIT)
    assert str(info.value) == f"{missing}: model not found"
    assert scene.GetNumberOfNodes() == before
    assert worker.pid is not None and worker.pid == task.process.worker_pid


def test_a_worker_that_dies_fails_its_job_and_the_next_job_restarts_it(
    worker, model, scene_with_ct
):
    scene, volume = scene_with_ct
    logic = SegmentLogic(scene, worker=worker)
    logic.segment(volume, model, "cpu")
    before, pid, starts = scene.GetNumberOfNodes(), worker.pid, worker.starts
    task = start_and_see_it_run(logic, volume, model)
    os.kill(pid, signal.SIGKILL)  # as a crash would
    with pytest.raises(RuntimeError) as info:
        task.wait(timeout=WAIT)
    message = str(info.value)
    assert message.startswith(
        "the MTKD engine worker stopped (exit code -9, SIGKILL); "
        "it will be restarted for the next job"
    ), message
    assert scene.GetNumberOfNodes() == before
    assert not task.workdir.exists()

    node = logic.segment(volume, model, "cpu")  # a new worker
    assert node.IsA("vtkMRMLSegmentationNode")
    assert worker.starts == starts + 1 and worker.pid not in (None, pid)

    os.kill(worker.pid, signal.SIGKILL)  # dies while idle: the next job does not fail
    wait_for(lambda: worker.pid is None, "the worker's end noticed")
    assert logic.segment(volume, model, "cpu").IsA("vtkMRMLSegmentationNode")
    assert worker.starts == starts + 2


def test_stop_ends_an_idle_worker_and_fails_a_running_job(worker, model, scene_with_ct):
    scene, volume = scene_with_ct
    logic = SegmentLogic(scene, worker=worker)
    logic.segment(volume, model, "cpu")
    stopped = worker.stop()  # idle: its input closes and it ends by itself
    assert stopped.popen.wait(WAIT) == 0 and worker.pid is None

    task = start_and_see_it_run(logic, volume, model)  # a new worker
    stopped = worker.stop()  # busy: killed at once
    with pytest.raises(RuntimeError, match="the MTKD engine worker was stopped"):
        task.wait(timeout=WAIT)
    assert stopped.popen.wait(WAIT) == -signal.SIGKILL
    assert worker.stop() is None  # none runs


def test_a_module_cleaned_up_leaves_the_other_modules_job_on_the_shared_worker(
    worker, model, scene_with_ct
):
    """Each module stops the shared worker when it is cleaned up (Slicer quits, or it is
    reloaded), after cancelling its own jobs: a job of the other module keeps the worker."""
    scene, volume = scene_with_ct
    logic = SegmentLogic(scene, worker=worker)
    task = start_and_see_it_run(logic, volume, model)  # the other module's job
    pid = worker.pid
    assert worker.stop(if_unused=True) is None  # kept
    assert task.wait(timeout=WAIT).IsA("vtkMRMLSegmentationNode") and worker.pid == pid

    task = start_and_see_it_run(logic, volume, model)
    task.cancel()  # the module's own job, cancelled first
    stopped = worker.stop(if_unused=True)
    assert stopped is not None and stopped.popen.wait(WAIT) is not None and worker.pid is None
    assert worker.stop(if_unused=True) is None  # none runs
    assert logic.segment(volume, model, "cpu").IsA("vtkMRMLSegmentationNode")  # a new worker


def test_the_stopped_message_names_the_signal_and_the_last_lines():
    assert stopped_message(1) == (
        "the MTKD engine worker stopped (exit code 1); it will be restarted for the next job"
    )
    text = stopped_message(-11, ["a", "b", "Segmentation fault"])
    assert "(exit code -11, SIGSEGV)" in text and text.endswith("\na\nb\nSegmentation fault")


def test_one_worker_per_session_and_its_module_needs_no_qt_or_torch():
    assert shared_worker() is shared_worker()
    code = (
        "import sys, MTKDLib.worker\n"
        "heavy = sorted({'qt', 'torch', 'monai', 'ctk', 'vtk'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [PYTHON, "-c", code], cwd=root, capture_output=True, text=True, timeout=WAIT
    )
    assert result.returncode == 0, result.stderr


def test_a_worker_that_cannot_start_fails_the_job_clearly(tmp_path):
    missing = tmp_path / "no-python"
    engine = EngineWorker(python=str(missing))
    job = engine.run(["segment", "model", "ct.nrrd", "-o", "out.seg.nrrd"])
    assert job.wait(WAIT) == 1 and engine.pid is None
    assert job.error_message().startswith("the MTKD engine worker could not start: ")
    assert str(missing) in job.error_message()
