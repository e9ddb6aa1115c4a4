"""``mtkd serve`` as the Slicer modules use it: a real worker process speaking JSON lines over
its stdin and stdout, running ``segment`` jobs on a crop of the bundled CT (and ``evaluate``
jobs on slabs of it) with a tiny untrained model. The second job reuses the loaded model and
gives what ``mtkd segment`` gives voxel for voxel (``mtkd evaluate``: the same scores), a
changed model is loaded again, a cancelled job leaves the worker alive, bad requests get error
replies, and the end of stdin or ``quit`` ends the worker."""

from __future__ import annotations

import csv
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import untrained_model

from mtkd.cli import main
from mtkd.modelfiles.model_io import WEIGHTS
from mtkd.progress import parse_progress

REPLY_TIMEOUT = 600  # seconds: only so that a broken worker fails the test instead of hanging


class Serve:
    """A ``python -m mtkd serve`` process and its replies."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mtkd", "serve", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env,
        )
        self.replies: queue.Queue[dict | None] = queue.Queue()
        self.raw: list[str] = []  # every stdout line: all must be JSON objects
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.reply()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.raw.append(line)
            self.replies.put(json.loads(line))
        self.replies.put(None)

    def send(self, **request) -> None:
        self.write(json.dumps(request))

    def write(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def reply(self) -> dict | None:
        return self.replies.get(timeout=REPLY_TIMEOUT)

    def job(self, job_id: str, argv: list[str]) -> tuple[list[str], dict]:
        self.send(id=job_id, argv=argv)
        return self.until_done(job_id)

    def until_done(self, job_id: str, on_line=None) -> tuple[list[str], dict]:
        """The job's lines and its done reply (other replies are not expected meanwhile)."""
        lines = []
        while True:
            reply = self.reply()
            assert reply is not None, "the worker ended before the job did"
            assert reply["id"] == job_id, reply
            if "done" in reply:
                return lines, reply
            lines.append(reply["line"])
            if on_line is not None:
                on_line(reply["line"])

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.stdin.close()
        return self.process.wait(REPLY_TIMEOUT)


def stop(worker: Serve) -> None:
    if worker.process.poll() is None:
        worker.process.kill()
        worker.process.wait()


@pytest.fixture(scope="module")
def shared():
    """One worker for the tests that leave it idle, as Slicer keeps one (starting one takes
    seconds: the torch and MONAI imports)."""
    worker = Serve()
    yield worker
    stop(worker)


@pytest.fixture
def serve():
    """``serve()`` starts a worker of the test's own."""
    workers = []

    def start(*args: str) -> Serve:
        workers.append(Serve(*args))
        return workers[-1]

    yield start
    for worker in workers:
        stop(worker)


STRUCTURES = ("liver", "spleen", "kidney_right")


@pytest.fixture(scope="module")
def original_model(tmp_path_factory) -> Path:
    """A tiny untrained model whose random weights (seed 0) label part of the crop."""
    return untrained_model(tmp_path_factory.mktemp("model") / "tiny", STRUCTURES, seed=0)


@pytest.fixture
def model(original_model, tmp_path) -> Path:
    """The test's own copy: new to the shared worker's cache."""
    return Path(shutil.copytree(original_model, tmp_path / "model"))


@pytest.fixture(scope="module")
def ct(data_dir, tmp_path_factory) -> Path:
    """A crop of the bundled abdomen CT."""
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    path = tmp_path_factory.mktemp("ct") / "abdomen_crop.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(image, [96, 80, 40], [13, 10, 40]), str(path))
    return path


def segment_argv(model: Path, images: list[Path], out: Path) -> list[str]:
    return ["segment", str(model), *map(str, images), "-o", str(out), "--device", "cpu",
            "--progress"]  # fmt: skip


def labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_the_second_job_reuses_the_model_and_matches_mtkd_segment(shared, model, ct, tmp_path):
    worker = shared
    assert worker.ready["ready"] is True and worker.ready["pid"] == worker.process.pid

    first, second = tmp_path / "first.nii.gz", tmp_path / "second.nii.gz"
    lines, done = worker.job("j1", segment_argv(model, [ct], first))
    assert done == {**done, "done": 0, "models_loaded": 1, "models_reused": 0}
    assert "error" not in done
    stages = [parse_progress(line).stage for line in lines if parse_progress(line)]
    assert stages[0] == "loading the model" and stages[-1] == "done"
    assert any(line.startswith(f"{ct} -> {first}") for line in lines)  # the command's own line

    lines, done = worker.job("j2", segment_argv(model, [ct], second))
    assert done["done"] == 0
    assert (done["models_loaded"], done["models_reused"]) == (0, 1)  # the model was kept

    expected = tmp_path / "cli.nii.gz"
    assert main(["segment", str(model), str(ct), "-o", str(expected), "--device", "cpu"]) == 0
    reference = labels(expected)
    assert len(np.unique(reference)) > 1  # a label map with structure, not a constant one
    assert np.array_equal(labels(first), reference)  # voxel for voxel
    assert np.array_equal(labels(second), reference)
    assert all(line.startswith("{") for line in worker.raw)  # nothing but the protocol


def test_a_changed_model_is_loaded_again(shared, model, ct, tmp_path):
    worker = shared
    _, done = worker.job("a", segment_argv(model, [ct], tmp_path / "a.nii.gz"))
    assert done["models_loaded"] == 1
    weights = model / WEIGHTS
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "retrained"
    _, done = worker.job("b", segment_argv(model, [ct], tmp_path / "b.nii.gz"))
    assert (done["done"], done["models_loaded"], done["models_reused"]) == (0, 1, 0)
    _, done = worker.job("c", segment_argv(model, [ct], tmp_path / "c.nii.gz"))
    assert (done["models_loaded"], done["models_reused"]) == (0, 1)


def scores_without_times(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as stream:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(stream)]


def test_an_evaluate_job_gives_the_csv_of_mtkd_evaluate_and_keeps_the_model(
    shared, model, slab_dataset, data_dir, tmp_path
):
    """MTKD Train's loop scores each version with ``mtkd evaluate`` jobs on the worker."""
    folder, split = slab_dataset
    split_file = tmp_path / "test_cases.json"
    split_file.write_text(json.dumps({"test": split["test"]}), encoding="utf-8")

    def evaluate_argv(scores: Path) -> list[str]:
        return ["evaluate", str(model), str(folder), "--labels-json",
                str(data_dir / "labels_total_v2.json"), "--split", str(split_file),
                "--subset", "test", "--csv", str(scores), "--device", "cpu"]  # fmt: skip

    first, second, expected = (tmp_path / f"{name}.csv" for name in ("first", "second", "cli"))
    lines, done = shared.job("e1", evaluate_argv(first))
    assert done == {**done, "done": 0, "models_loaded": 1, "models_reused": 0}, done
    assert any(f"per-volume scores in {first}" in line for line in lines)  # the command's line
    _, done = shared.job("e2", evaluate_argv(second))
    assert (done["done"], done["models_loaded"], done["models_reused"]) == (0, 0, 1)

    assert main(evaluate_argv(expected)) == 0
    reference = scores_without_times(expected)
    assert {row["case"] for row in reference} == set(split["test"])
    assert {row["structure"] for row in reference} == set(STRUCTURES)
    assert scores_without_times(first) == reference
    assert scores_without_times(second) == reference
    assert all(line.startswith("{") for line in shared.raw)  # nothing but the protocol


@pytest.fixture(scope="module")
def many_cts(data_dir, tmp_path_factory) -> list[Path]:
    """30 small crops of the bundled CT: a job that takes a while."""
    folder = tmp_path_factory.mktemp("many")
    image = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    crop = sitk.RegionOfInterest(image, [48, 40, 8], [40, 30, 60])
    images = []
    for index in range(30):
        images.append(folder / f"ct{index:02d}.nii.gz")
        sitk.WriteImage(crop, str(images[-1]))
    return images


def test_cancel_stops_the_job_and_the_worker_takes_the_next(shared, model, many_cts, tmp_path):
    """A job of many images, cancelled once the first is written: it stops at its next stage
    (the rest is never written) and the same worker runs the next job."""
    images, out, worker = many_cts, tmp_path / "out", shared
    worker.send(id="long", argv=segment_argv(model, images, Path(f"{out}/")))

    def cancel_after_the_first_image(line: str) -> None:
        if " -> " in line and not getattr(cancel_after_the_first_image, "sent", False):
            cancel_after_the_first_image.sent = True
            worker.send(cancel="long")

    lines, done = worker.until_done("long", cancel_after_the_first_image)
    assert done["done"] == 130 and done["cancelled"] is True and done["error"] == "cancelled"
    written = sorted(out.iterdir())
    assert 1 <= len(written) < len(images)
    assert sum(" -> " in line for line in lines) == len(written)  # no file half-written

    pid = worker.process.pid
    lines, done = worker.job("next", segment_argv(model, images[:1], tmp_path / "n.nii.gz"))
    assert done["done"] == 0 and done["models_reused"] == 1
    assert worker.process.poll() is None and worker.process.pid == pid

    worker.send(cancel="next")  # a job that has ended: nothing happens
    worker.send(cancel="nobody")
    _, done = worker.job("after", segment_argv(model, images[:1], tmp_path / "m.nii.gz"))
    assert done["done"] == 0


def test_a_cancelled_waiting_job_never_runs(shared, model, ct, tmp_path):
    worker = shared
    worker.send(id="first", argv=segment_argv(model, [ct], tmp_path / "first.nii.gz"))
    worker.send(id="second", argv=segment_argv(model, [ct], tmp_path / "second.nii.gz"))
    worker.send(cancel="second")
    _, done = worker.until_done("first")
    assert done["done"] == 0
    lines, done = worker.until_done("second")
    assert lines == [] and done["cancelled"] is True
    assert not (tmp_path / "second.nii.gz").exists()


def test_bad_requests_get_error_replies_and_the_worker_goes_on(shared, model, ct, tmp_path):
    worker = shared
    worker.write("{not json")
    reply = worker.reply()
    assert reply["id"] is None and "not JSON" in reply["error"]
    assert reply["error"].startswith("request line ")  # which line
    worker.write("[1, 2]")
    assert "a request is a JSON object" in worker.reply()["error"]
    worker.send(id="t", argv=["train", "config.yaml"])
    reply = worker.reply()
    assert reply["id"] == "t" and reply["done"] == 2
    assert "'train' is not a job the worker runs" in reply["error"]
    worker.send(id="n", argv="segment model ct.nii.gz")
    assert "must be a list of strings" in worker.reply()["error"]
    worker.send(argv=["segment"])
    assert 'a job needs an "id"' in worker.reply()["error"]

    missing = tmp_path / "no-such-model"
    lines, done = worker.job("m", segment_argv(missing, [ct], tmp_path / "x.nii.gz"))
    assert done["done"] == 2 and done["error"] == f"{missing}: model not found"
    assert lines[-1] == f"mtkd: error: {missing}: model not found"  # as the command prints it

    _, done = worker.job("o", ["segment", str(model), str(ct)])  # no -o
    assert done["done"] == 2
    assert done["error"] == "bad command line: the following arguments are required: -o/--output"

    lines, done = worker.job("ok", segment_argv(model, [ct], tmp_path / "ok.nii.gz"))
    assert done["done"] == 0 and (tmp_path / "ok.nii.gz").is_file()
    assert worker.process.poll() is None


def test_quit_ends_the_worker_after_the_jobs_sent(serve, model, ct, tmp_path):
    worker = serve()
    worker.send(id="last", argv=segment_argv(model, [ct], tmp_path / "last.nii.gz"))
    worker.send(quit=True)
    _, done = worker.until_done("last")
    assert done["done"] == 0
    assert worker.reply() is None  # stdout closed
    assert worker.process.wait(REPLY_TIMEOUT) == 0


def test_the_end_of_stdin_cancels_the_job_and_ends_the_worker(serve, model, many_cts, tmp_path):
    """Slicer has gone (its end of the pipe closed): the running job stops at its next stage
    and the worker exits."""
    worker = serve()
    out = tmp_path / "out"
    worker.send(id="long", argv=segment_argv(model, many_cts, Path(f"{out}/")))
    while " -> " not in (worker.reply() or {"line": " -> "}).get("line", ""):
        pass  # the first image is written
    assert worker.close() == 0
    assert 1 <= len(list(out.iterdir())) < len(many_cts)


def test_serve_refuses_a_cache_of_no_models():
    result = subprocess.run(
        [sys.executable, "-m", "mtkd", "serve", "--models", "0"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=REPLY_TIMEOUT,
    )
    assert result.returncode == 2
    assert "mtkd: error: --models must be at least 1, not 0" in result.stderr
