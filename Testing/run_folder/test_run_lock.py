"""One writer per run folder (issue 14, item 3): two ``mtkd distill --resume RUN`` at once, a
stale lock of a killed process, a lock of another host, racing recoveries of one stale lock,
the trainer's release on every way out, the ablation folder, and the Slicer Train logic (its
Start and Resume refused while locked, the engine's refusal shown as the run's error, and no
lock left behind by its Kill)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, tiny_config
from helpers import stop_at_batch

from mtkd.config import RunConfig, load_config
from mtkd.engine.signals import stop_file
from mtkd.engine.trainer import Trainer, TrainingInterrupted
from mtkd.errors import MTKDError
from mtkd.folder_lock import LOCK_NAME, FolderLock, FolderLocked, check_unlocked, holder_of
from mtkd.run_folder import read_events
from MTKDLib.process import BackgroundProcess, engine_command, engine_environment
from MTKDLib.train_config import TrainingOptions, distill_arguments
from MTKDLib.train_logic import TrainingRun, TrainLogic

PYTHON = sys.executable
LINUX = sys.platform.startswith("linux")

# A process that takes a folder's lock, says so, and holds it until killed.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from mtkd.folder_lock import FolderLock
    lock = FolderLock(sys.argv[1], "test holder").acquire()
    print("held", flush=True)
    while True:
        time.sleep(1)
    """
)

# Racers: each says "ready", waits for GO, tries the lock once and prints "won" or "lost";
# the winner holds it until RELEASE exists.
RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mtkd.folder_lock import FolderLock, FolderLocked
    folder, signals = Path(sys.argv[1]), Path(sys.argv[2])
    print("ready", flush=True)
    while not (signals / "GO").exists():
        time.sleep(0.001)
    lock = FolderLock(folder, "racer")
    try:
        lock.acquire()
    except FolderLocked:
        print("lost", flush=True)
        sys.exit(0)
    print("won", flush=True)
    while not (signals / "RELEASE").exists():
        time.sleep(0.01)
    lock.release()
    """
)


def environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def python(code: str, *args: str, **options) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
        env=environment(),
        **options,
    )


@pytest.fixture
def holder():
    """``holder(folder)`` -> a real process holding ``folder``'s lock (killed at the end)."""
    started = []

    def start(folder: Path) -> subprocess.Popen:
        process = python(HOLDER, folder)
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    process = subprocess.Popen([PYTHON, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(folder: Path, **fields) -> Path:
    """A lock file as another process would have left it."""
    folder.mkdir(parents=True, exist_ok=True)
    content = {
        "pid": 4242,
        "host": socket.gethostname(),
        "since": 1700000000.0,
        "command": "python -m mtkd distill --resume run",
        "purpose": "mtkd distill --resume",
        "token": "0" * 32,
        **fields,
    }
    path = folder / LOCK_NAME
    path.write_text(json.dumps(content))
    return path


# ------------------------------------------------------------------ the lock itself
def test_a_live_holder_is_named_and_its_lock_is_kept(holder, tmp_path):
    folder = tmp_path / "run"
    process = holder(folder)
    before = (folder / LOCK_NAME).read_bytes()
    with pytest.raises(FolderLocked) as info:
        FolderLock(folder, "second").acquire()
    message = str(info.value)
    assert str(folder) in message and f"pid {process.pid}" in message
    assert "test holder" in message and "since" in message
    assert info.value.holder.pid == process.pid
    assert (folder / LOCK_NAME).read_bytes() == before  # untouched


def test_a_stale_lock_of_a_killed_process_is_recovered(holder, tmp_path):
    folder = tmp_path / "run"
    process = holder(folder)
    process.send_signal(signal.SIGKILL)
    process.wait()  # dead and reaped; its lock stays behind
    assert holder_of(folder).pid == process.pid
    with FolderLock(folder, "after the kill") as lock:
        assert holder_of(folder).pid == os.getpid() and lock.held
    assert not (folder / LOCK_NAME).exists()


def test_a_lock_of_a_dead_pid_is_recovered(tmp_path):
    folder = tmp_path / "run"
    write_lock(folder, pid=dead_pid())
    with FolderLock(folder, "recovering"):
        assert holder_of(folder).purpose == "recovering"


@pytest.mark.skipif(not LINUX, reason="process start times and zombies are read from /proc")
def test_a_reused_pid_or_a_zombie_holder_counts_as_dead(tmp_path):
    host = socket.gethostname()
    other = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)"])
    zombie = subprocess.Popen([PYTHON, "-c", "pass"])
    try:
        # a live process, but not the one that took the lock (another start time)
        write_lock(tmp_path / "reused", pid=other.pid, host=host, process_start=1)
        with FolderLock(tmp_path / "reused", "after reuse"):
            pass
        # a live process with the recorded start time is the holder
        start = int(Path(f"/proc/{other.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        write_lock(tmp_path / "same", pid=other.pid, host=host, process_start=start)
        with pytest.raises(FolderLocked, match=f"pid {other.pid}"):
            FolderLock(tmp_path / "same", "second").acquire()
        # a process that has ended but is not reaped yet (a zombie)
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        write_lock(tmp_path / "zombie", pid=zombie.pid, host=host)
        with FolderLock(tmp_path / "zombie", "after the zombie"):
            pass
    finally:
        other.kill()
        other.wait()
        zombie.wait()


def test_a_lock_of_another_host_is_not_broken(tmp_path):
    folder = tmp_path / "run"
    path = write_lock(folder, pid=dead_pid(), host="gpu-server-7")
    before = path.read_bytes()
    with pytest.raises(FolderLocked) as info:
        FolderLock(folder, "here").acquire()
    message = str(info.value)
    assert "another machine" in message and "gpu-server-7" in message
    assert f"delete {path}" in message
    assert path.read_bytes() == before


def test_an_unreadable_lock_is_named_not_broken(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / LOCK_NAME
    path.write_bytes(b"\x00garbage")
    os.utime(path, (1_600_000_000, 1_600_000_000))  # not one being written now
    with pytest.raises(FolderLocked, match="unreadable"):
        FolderLock(folder, "here").acquire()
    assert path.read_bytes() == b"\x00garbage"


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_racing_writers_exactly_one_wins(tmp_path, stale):
    """Eight processes try the lock at the same moment (a free folder, or one whose lock a
    dead process left, which all of them try to recover): exactly one wins."""
    folder, signals = tmp_path / "run", tmp_path / "signals"
    folder.mkdir()
    signals.mkdir()
    if stale:
        write_lock(folder, pid=dead_pid())
    racers = [python(RACER, folder, signals) for _ in range(8)]
    try:
        assert all(racer.stdout.readline().strip() == "ready" for racer in racers)
        (signals / "GO").touch()
        results = [racer.stdout.readline().strip() for racer in racers]
        assert sorted(results) == ["lost"] * 7 + ["won"]
        winner = racers[results.index("won")]
        assert holder_of(folder).pid == winner.pid
        (signals / "RELEASE").touch()
        assert [racer.wait(60) for racer in racers] == [0] * 8
        assert not (folder / LOCK_NAME).exists()
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
            racer.wait()


def test_a_lock_taken_twice_in_one_process_is_refused(tmp_path):
    with FolderLock(tmp_path, "first"), pytest.raises(FolderLocked, match=f"pid {os.getpid()}"):
        FolderLock(tmp_path, "second").acquire()
    with FolderLock(tmp_path, "again"):  # released: free again
        pass


def test_a_file_is_not_a_folder_to_lock(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(MTKDError, match="cannot create the folder"):
        FolderLock(path, "here").acquire()


# ---------------------------------------------------------------------- the trainer
def student_config(make_config, teacher_run, epochs: int) -> dict:
    return make_config(
        "distill",
        name="student",
        model={"name": "thesis_s1", "params": {}},
        train_on="student_train",
        train__epochs=epochs,
        distill={"teacher": str(teacher_run)},
    )


def quiet(config: dict, run_dir: Path, **options) -> Trainer:
    return Trainer(
        RunConfig.from_dict(config), run_dir, progress=False, log=lambda _: None, **options
    )


@pytest.fixture(scope="module")
def stopped_run(slab_dataset, teacher_run, tmp_path_factory) -> Path:
    """A distillation of 1000 epochs stopped in its first epoch (checkpoint saved)."""
    run = tmp_path_factory.mktemp("lock") / "student"
    config = tiny_config(
        slab_dataset,
        "distill",
        name="student",
        model={"name": "thesis_s1", "params": {}},
        train_on="student_train",
        distill={"teacher": str(teacher_run)},
    )
    config["train"]["epochs"] = 1000
    config["train"]["batch_size"] = 2
    trainer = quiet(config, run)
    stop_at_batch(trainer, 1)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / LOCK_NAME).exists()
    return run


def resume_process(run: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "mtkd", "distill", "--resume", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )


@pytest.mark.slow
def test_two_resumes_at_once_one_runs_the_other_is_refused(stopped_run):
    run = stopped_run
    seen = len(read_events(run / "events.jsonl"))
    first, second = resume_process(run), resume_process(run)
    try:
        while first.poll() is None and second.poll() is None:
            events = read_events(run / "events.jsonl")[seen:]
            started = {e["pid"] for e in events if e.get("state") == "preparing"}
            assert len(started) < 2, "both processes run at once"
            time.sleep(0.05)
        refused = first if first.poll() is not None else second
        winner = second if refused is first else first
        _, error = refused.communicate(timeout=120)
        assert refused.returncode == 2, error
        lines = error.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mtkd: error: {run}: ")
        assert f"in use by pid {winner.pid}" in lines[0]
        assert "mtkd distill --resume" in lines[0]
        assert winner.poll() is None and holder_of(run).pid == winner.pid
        winner.send_signal(signal.SIGTERM)  # stops at its next safe point
        _, error = winner.communicate(timeout=300)
        assert winner.returncode == 130, error
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
            process.wait()
    assert not (run / LOCK_NAME).exists()  # released on the stop request
    new = read_events(run / "events.jsonl")[seen:]
    assert {e["pid"] for e in new if "pid" in e} == {winner.pid}  # one writer only
    assert [e["type"] for e in new].count("error") == 0
    assert [e.get("state") for e in new].count("preparing") == 1


def test_a_refused_trainer_writes_nothing(stopped_run, holder):
    run = stopped_run
    process = holder(run)
    files = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    config = load_config(run / "config.yaml")
    trainer = Trainer(config, run, resume=True, progress=False, log=lambda _: None)
    stop_at_batch(trainer, 1)  # (were it not refused, it would stop at once)
    with pytest.raises(FolderLocked, match=f"pid {process.pid}"):
        trainer.run()
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == files


def test_the_trainer_releases_the_lock_on_an_error_and_on_a_stop(
    make_config, teacher_run, tmp_path
):
    config = student_config(make_config, teacher_run, epochs=3)
    broken = dict(config, data={**config["data"], "source": str(tmp_path / "missing")})
    with pytest.raises(MTKDError, match="missing"):
        quiet(broken, tmp_path / "new" / "failed").run()
    assert not (tmp_path / "new").exists()  # refused at its start: no folder left behind
    (tmp_path / "kept").mkdir()
    with pytest.raises(MTKDError, match="missing"):
        quiet(broken, tmp_path / "kept").run()
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())

    trainer = quiet(config, tmp_path / "stopped")
    stop_at_batch(trainer, 2)  # as a SIGINT/SIGTERM does: checkpoint, then TrainingInterrupted
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    assert not (tmp_path / "stopped" / LOCK_NAME).exists()

    trainer = quiet(config, tmp_path / "stopped", resume=True)
    original = trainer._batch_loss

    def ctrl_c_twice(*args):  # a real SIGINT twice: the second one raises KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    trainer._batch_loss = ctrl_c_twice
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert not (tmp_path / "stopped" / LOCK_NAME).exists()
    with FolderLock(tmp_path / "stopped", "next"):  # free for the next run
        pass


def test_a_second_ablation_in_the_same_folder_is_refused(
    slab_dataset, teacher_run, holder, tmp_path
):
    from conftest import ablation_config

    from mtkd.ablation.run import ablation_from_dict, run_ablation

    ablation = ablation_from_dict(ablation_config(slab_dataset, teacher_run, {"seeds": [0]}))
    folder = tmp_path / "grid"
    process = holder(folder)
    with pytest.raises(FolderLocked, match=f"pid {process.pid}"):
        run_ablation(ablation, folder, log=lambda _: None)
    assert sorted(path.name for path in folder.iterdir()) == [LOCK_NAME]  # nothing written


# ------------------------------------------------------------------ Slicer's Train logic
def test_slicer_start_and_resume_are_refused_while_another_process_writes(
    stopped_run, holder, tmp_path
):
    run = stopped_run
    process = holder(run)
    config = (run / "config.yaml").read_bytes()
    logic = TrainLogic(None, python=PYTHON)
    with pytest.raises(FolderLocked, match=f"pid {process.pid}"):
        logic.resume(run)
    fresh = tmp_path / "fresh"
    other = holder(fresh)
    options = TrainingOptions(dataset=str(tmp_path), teacher=str(tmp_path))
    with pytest.raises(FolderLocked, match=f"pid {other.pid}"):
        logic.start(options, fresh)
    assert not (fresh / "config.yaml").exists()
    assert (run / "config.yaml").read_bytes() == config


def test_slicer_shows_the_engines_refusal_as_the_runs_error(stopped_run, holder):
    """A resume that lost the race (the panel's check passed, then another process took the
    lock before the engine did) ends with the engine's one-line error as the run's error."""
    run = stopped_run
    process = holder(run)
    command = engine_command(distill_arguments(run, resume=True), PYTHON)
    launched_at = time.time()
    child = BackgroundProcess(command, env=engine_environment(), stop_file=stop_file(run))
    followed = TrainingRun(run, child, launched_at=launched_at)
    try:
        while child.running:
            assert followed.poll().state != "training", "it runs beside the holder"
            time.sleep(0.05)
    finally:
        child.kill()
    state = followed.poll()
    assert child.returncode == 2
    assert state.state == "failed", state.state
    assert f"in use by pid {process.pid}" in state.error and str(run) in state.error


def test_slicer_kill_leaves_no_lock_that_blocks_the_next_start(stopped_run):
    """Kill (the panel's Cancel once its grace has passed) ends the process tree at once; its
    lock stays on disk, and the next Resume recovers it."""
    run = stopped_run
    child = BackgroundProcess([PYTHON, "-c", HOLDER, str(run)], env=environment())
    lines: list[str] = []
    while "held" not in lines:
        assert child.running, lines
        lines += child.read_lines()
        time.sleep(0.01)
    child.kill()
    assert holder_of(run).pid == child.pid  # left behind by the killed process
    check_unlocked(run)  # what TrainLogic.resume checks first: passes
    assert not (run / LOCK_NAME).exists()
    with FolderLock(run, "next run"):
        pass


def test_torchrun_ranks_all_stop_when_rank_0_cannot_lock(make_config, holder, tmp_path):
    """Under torchrun rank 0 takes the lock; when it cannot, every rank stops at once (none
    waits for it in a collective) and nothing is written to the folder."""
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(make_config("train", train__epochs=1)))  # JSON is YAML
    run = tmp_path / "run"
    process = holder(run)
    torchrun = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "mtkd", "train", str(config), "--run-dir", str(run)],
        capture_output=True,
        text=True,
        env={**environment(), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    output = torchrun.stdout + torchrun.stderr
    assert torchrun.returncode != 0
    assert f"mtkd: error: {run}: this folder is in use by pid {process.pid}" in output
    assert f"mtkd: error: {run}: rank 0 could not lock the run folder" in output
    assert sorted(path.name for path in run.iterdir()) == [LOCK_NAME]
    assert holder_of(run).pid == process.pid


def test_a_writer_can_wait_for_the_holder_to_finish(tmp_path):
    """``acquire(timeout=...)`` waits for a holder that releases (short writes, e.g. adding a
    case to a dataset folder)."""
    import threading

    folder, signals = tmp_path / "dataset", tmp_path / "signals"
    signals.mkdir()
    racer = python(RACER, folder, signals)
    try:
        assert racer.stdout.readline().strip() == "ready"
        (signals / "GO").touch()
        assert racer.stdout.readline().strip() == "won"
        with pytest.raises(FolderLocked):
            FolderLock(folder, "impatient").acquire()
        threading.Thread(target=(signals / "RELEASE").touch).start()
        with FolderLock(folder, "patient").acquire(timeout=120) as lock:
            assert holder_of(folder).purpose == "patient" and lock.held
        assert racer.wait(60) == 0
    finally:
        if racer.poll() is None:
            racer.kill()
        racer.wait()


def test_a_second_protocol_on_the_same_runs_folder_is_refused(holder, tmp_path, capsys):
    from helpers import SPLEEN, TINY_T1, spleen_task09

    from mtkd.cli import main

    data = spleen_task09(tmp_path / "Task09_Spleen", 6)
    runs = tmp_path / "runs"
    process = holder(runs)
    args = ["protocol", SPLEEN, "--data", str(data), "--runs", str(runs), "--epochs", "1"]
    for item in TINY_T1:
        args += ["--set", item]
    assert main([*args, "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert f"pid {process.pid}" in error and str(runs) in error
    assert sorted(path.name for path in runs.iterdir()) == [LOCK_NAME]  # no stage started


def test_pid_exists_tells_a_running_process_from_an_ended_one():
    from mtkd.processes import pid_exists

    assert pid_exists(os.getpid())
    assert not pid_exists(dead_pid()) and not pid_exists(0) and not pid_exists(-1)
