"""Following a run through its ``events.jsonl`` (MTKDLib.run_monitor): incremental reading with
torn lines and replaced files, the state a front end shows, ETA, the process check, and the
table and plot nodes in a real headless MRML scene (``slicer-core``). Events are written by the
engine's own EventLog, and real runs of the tiny trainer are followed while they run."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from slicer_scene import new_scene

from mtkd.config import RunConfig
from mtkd.engine.trainer import Trainer, TrainingInterrupted
from mtkd.run_folder import EventLog, read_events
from MTKDLib.process import pid_alive
from MTKDLib.run_monitor import (
    EventFollower,
    RunMonitor,
    RunState,
    format_duration,
    format_status,
)
from MTKDLib.run_plots import RunPlots, plot_view_node

HOST = socket.gethostname()


def event_log(run_dir: Path) -> EventLog:
    run_dir.mkdir(parents=True, exist_ok=True)
    return EventLog(run_dir / "events.jsonl")


def epoch_record(epoch: int, epochs: int, validated: bool, **terms: float) -> dict:
    """A metrics event's fields as the trainer writes them."""
    record = {"epoch": epoch, "epochs": epochs, "lr": 0.01 / epoch, "seconds": 4.0}
    record["loss"] = round(2.0 / epoch, 6)
    record["seg"] = round(1.5 / epoch, 6)
    record.update(terms)
    if validated:
        record["val_dice"] = 0.2 * epoch
        record["val_dice_per_structure"] = {"liver": 0.3 * epoch, "spleen": 0.1 * epoch}
    return record


def start(log: EventLog, at: float = 1000.0, epochs: int = 4, **preparing) -> None:
    log.emit("status", time=at, state="preparing", kind="distill", resume=False, **preparing)
    log.emit(
        "status",
        time=at + 5,
        state="training",
        start_epoch=0,
        epochs=epochs,
        train_cases=5,
        train_samples=15,
        val_cases=2,
        device="cpu",
    )


def column(table_node, name: str) -> list[float]:
    array = table_node.GetTable().GetColumnByName(name)
    assert array is not None, name
    return [array.GetValue(i) for i in range(array.GetNumberOfTuples())]


def series_count(scene) -> int:
    return scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems()


def same_numbers(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y) for x, y in zip(a, b)
    )


# ----------------------------------------------------------------------- the follower
def test_follower_waits_for_the_file_and_keeps_a_torn_line_for_later(tmp_path):
    path = tmp_path / "run" / "events.jsonl"
    follower = EventFollower(path)
    assert follower.read_new() == []  # neither the folder nor the file exists yet
    log = event_log(path.parent)
    log.emit("status", state="preparing", kind="train", resume=False)
    events = follower.read_new()
    assert [e["state"] for e in events] == ["preparing"]
    assert follower.read_new() == []

    line = path.read_bytes().splitlines(keepends=True)[0].replace(b"preparing", b"training")
    with open(path, "ab") as handle:  # half a line, as a reader may see it mid-write
        handle.write(line[:20])
    assert follower.read_new() == []
    assert follower.offset == len(path.read_bytes()) - 20
    with open(path, "ab") as handle:
        handle.write(line[20:])
    assert [e["state"] for e in follower.read_new()] == ["training"]
    assert follower.offset == path.stat().st_size

    with open(path, "ab") as handle:  # a complete line that is no JSON object is skipped
        handle.write(b"{not json\n[1, 2]\n")
    log.emit("done", model="m")
    assert [e["type"] for e in follower.read_new()] == ["done"]
    assert follower.resets == 0


def test_follower_starts_over_when_the_file_is_replaced_or_truncated(tmp_path):
    log = event_log(tmp_path)
    path = log.path
    follower = EventFollower(path)
    for epoch in (1, 2, 3):
        log.emit("metrics", epoch=epoch, loss=1.0)
    assert len(follower.read_new()) == 3

    # truncated in place and rewritten longer than before (same inode, bigger): new first line
    size = path.stat().st_size
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("")
    while path.stat().st_size <= size:
        log.emit("status", state="preparing", note="a new run, longer than the old one")
    events = follower.read_new()
    assert follower.resets == 1
    assert events and all(e.get("note") for e in events)
    assert len(events) == len(read_events(path))

    # truncated to less than was read
    path.write_text("")
    assert follower.read_new() == []
    assert follower.resets == 2
    log.emit("metrics", epoch=1, loss=0.5)
    assert [e["loss"] for e in follower.read_new()] == [0.5]

    # removed (a new run being set up), then a new file
    path.unlink()
    assert follower.read_new() == []
    assert follower.resets == 3
    assert follower.read_new() == []
    assert follower.resets == 3
    log.emit("metrics", epoch=1, loss=0.25)
    assert [e["loss"] for e in follower.read_new()] == [0.25]


# ------------------------------------------------------------------ the run's state
def test_states_history_and_status_lines_of_a_whole_run(tmp_path):
    log = event_log(tmp_path)
    monitor = RunMonitor(tmp_path)
    state = monitor.update()
    assert state.state == "waiting" and state.progress == 0.0 and state.eta_seconds is None
    assert format_status(state) == "waiting for the run to start"

    argv = [sys.argv[0], "distill", "c.yaml", "--run-dir", str(tmp_path)]
    log.emit("status", time=1000.0, state="preparing", kind="distill", resume=False,
             pid=4321, host="elsewhere", argv=argv)  # fmt: skip
    state = monitor.update()
    assert (state.state, state.kind, state.pid, state.host, state.argv) == (
        "preparing", "distill", 4321, "elsewhere", argv
    )  # fmt: skip
    assert format_status(state) == "preparing: reading the data, building the networks"
    log.emit("status", time=1002.0, state="initial_validation", val_dice=0.12)
    state = monitor.update()
    assert (state.state, state.phase, state.initial_val_dice) == (
        "preparing", "initial_validation", 0.12
    )  # fmt: skip
    assert format_status(state) == "preparing: initial val Dice 0.12"

    log.emit("status", time=1005.0, state="training", start_epoch=0, epochs=4, train_cases=5,
             train_samples=15, val_cases=2, device="cpu")  # fmt: skip
    state = monitor.update()
    assert (state.state, state.epoch, state.epochs, state.progress) == ("training", 0, 4, 0.0)
    assert state.details["train_cases"] == 5 and state.details["device"] == "cpu"
    assert state.eta_seconds is None
    assert format_status(state) == "training: first of 4 epochs running"

    records = [
        epoch_record(1, 4, False),
        epoch_record(2, 4, True, **{"infonce:E-E": 0.7}),  # a term that appears later
        epoch_record(3, 4, False, **{"infonce:E-E": 0.6}),
    ]
    for number, record in enumerate(records, 1):
        log.emit("metrics", time=1005.0 + 10 * number, **record)
        log.emit("log", message=f"epoch {number} done")
    state = monitor.update()
    assert state.state == "training" and state.epoch == 3 and state.progress == 0.75
    assert [r["epoch"] for r in state.history] == [1, 2, 3]
    assert state.history[1]["infonce:E-E"] == 0.7
    assert state.loss_terms == ["loss", "seg", "infonce:E-E"]
    assert state.val_metrics == ["val_dice"]  # the per-structure dict is no metric column
    assert (state.best_val_dice, state.best_epoch) == (pytest.approx(0.4), 2)
    assert state.eta_seconds == pytest.approx(10.0)  # 30 s for 3 epochs, 1 left
    assert state.log == ["epoch 1 done", "epoch 2 done", "epoch 3 done"]
    assert format_status(state) == "epoch 3/4, ETA 10 s, loss 0.67, val Dice 0.40"
    assert monitor.update() == state  # nothing new: the same state

    log.emit("metrics", time=1045.0, **epoch_record(4, 4, True, **{"infonce:E-E": 0.5}))
    log.emit("status", time=1046.0, state="exporting")
    state = monitor.update()
    assert (state.state, state.progress, state.eta_seconds) == ("exporting", 0.99, None)
    assert format_status(state) == "exporting the model (best val Dice 0.80 at epoch 4)"

    log.emit("done", time=1047.0, model=str(tmp_path / "model"), best_val_dice=0.8, best_epoch=4,
             initial_val_dice=0.12)  # fmt: skip
    state = monitor.update()
    assert (state.state, state.progress, state.model) == ("finished", 1.0, str(tmp_path / "model"))
    assert (state.best_val_dice, state.best_epoch, state.error) == (0.8, 4, None)
    assert state.initial_val_dice == 0.12
    assert format_status(state) == "finished: best val Dice 0.80 at epoch 4"
    assert RunMonitor.format_status(state) == format_status(state)
    assert state.ended and state.events == 12

    # re-attaching to the finished run: one update reads it all
    again = RunMonitor(tmp_path).update()
    assert again.state == "finished" and again.history == state.history


def test_eta_is_the_mean_epoch_time_of_this_session(tmp_path):
    log = event_log(tmp_path)
    monitor = RunMonitor(tmp_path)
    start(log, at=1000.0, epochs=10)  # training starts at 1005
    log.emit("metrics", time=1015.0, **epoch_record(1, 10, False))
    assert monitor.update().eta_seconds == pytest.approx(10.0 * 9)
    log.emit("metrics", time=1045.0, **epoch_record(2, 10, True))  # 20 s more with validation
    state = monitor.update()
    assert state.eta_seconds == pytest.approx(20.0 * 8)
    assert format_status(state).startswith("epoch 2/10, ETA 3 min, loss 1.00, val Dice 0.40")
    assert format_duration(3 * 3600 + 5 * 60) == "3 h 05 min"

    # stopped, then resumed much later: only the new session's epochs count
    log.emit("status", time=1050.0, state="interrupted", epoch=2, signal="SIGTERM")
    assert monitor.update().eta_seconds is None
    log.emit("status", time=9000.0, state="preparing", kind="distill", resume=True)
    log.emit("status", time=9010.0, state="training", start_epoch=2, epochs=10)
    state = monitor.update()
    assert state.eta_seconds is None and state.epoch == 2 and state.progress == 0.2
    assert format_status(state).startswith("epoch 2/10, loss 1.00")  # no ETA yet
    log.emit("metrics", time=9014.0, **epoch_record(3, 10, False))
    assert monitor.update().eta_seconds == pytest.approx(4.0 * 7)

    # events without times: the records' own seconds
    other = tmp_path / "untimed"
    log2 = event_log(other)
    log2.emit("status", time=None, state="training", start_epoch=0, epochs=5)
    log2.emit("metrics", time=None, **{**epoch_record(1, 5, False), "seconds": 6.0})
    log2.emit("metrics", time=None, **{**epoch_record(2, 5, False), "seconds": 8.0})
    assert RunMonitor(other).update().eta_seconds == pytest.approx(7.0 * 3)


def test_failed_run(tmp_path):
    log = event_log(tmp_path)
    start(log, epochs=4)
    log.emit("metrics", time=1010.0, **epoch_record(1, 4, True))
    log.emit("error", time=1011.0, message="CUDA out of memory")
    state = RunMonitor(tmp_path).update()
    assert (state.state, state.error, state.epoch, state.progress) == (
        "failed", "CUDA out of memory", 1, 0.25
    )  # fmt: skip
    assert state.eta_seconds is None and state.ended
    assert format_status(state) == "failed: CUDA out of memory"


def test_interrupted_run_resumed_from_an_older_checkpoint(tmp_path):
    log = event_log(tmp_path)
    monitor = RunMonitor(tmp_path)
    log.emit("status", time=1000.0, state="preparing", kind="distill", resume=False)
    log.emit("status", time=1002.0, state="initial_validation", val_dice=0.05)
    log.emit("status", time=1005.0, state="training", start_epoch=0, epochs=5)
    for epoch in (1, 2, 3):
        log.emit("metrics", time=1005.0 + 10 * epoch, **epoch_record(epoch, 5, epoch == 2))
    log.emit("status", time=1040.0, state="interrupted", epoch=3, signal="SIGTERM")
    state = monitor.update()
    assert (state.state, state.epoch, state.stopped_by) == ("interrupted", 3, "SIGTERM")
    assert state.progress == 0.6 and state.ended
    assert format_status(state) == "stopped at epoch 3 (checkpoint kept; Resume continues)"

    # killed before epoch 3's checkpoint: the resume repeats epoch 3, which replaces the old
    log.emit("status", time=2000.0, state="preparing", kind="distill", resume=True)
    state = monitor.update()
    assert state.state == "preparing" and state.resumed and state.stopped_by is None
    assert format_status(state).startswith("resuming")
    log.emit("status", time=2005.0, state="training", start_epoch=2, epochs=5)
    state = monitor.update()
    assert (state.state, state.epoch, len(state.history)) == ("training", 2, 3)
    log.emit("metrics", time=2015.0, **epoch_record(3, 5, True, extra=0.1))
    state = monitor.update()
    assert [r["epoch"] for r in state.history] == [1, 2, 3]
    assert state.history[2]["extra"] == 0.1 and state.epoch == 3
    assert state.initial_val_dice == 0.05  # validated once, before the first session
    assert (state.best_val_dice, state.best_epoch) == (pytest.approx(0.6), 3)


def test_log_lines_keep_the_last_twenty(tmp_path):
    log = event_log(tmp_path)
    monitor = RunMonitor(tmp_path)
    log.emit("log", message="from the run\nsecond line")
    monitor.update()
    monitor.add_output_lines(["stdout line\n", "", 'MTKD-PROGRESS {"fraction": 0.5}'])
    assert monitor.update().log == ["from the run", "second line", "stdout line"]
    monitor.add_output_lines(f"line {n}" for n in range(30))
    assert monitor.update().log == [f"line {n}" for n in range(10, 30)]


# ------------------------------------------------------------------- the process
def test_process_alive(tmp_path):
    def monitor_for(**preparing) -> RunMonitor:
        folder = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        log = event_log(folder)
        log.emit("status", state="preparing", kind="train", resume=False, **preparing)
        monitor = RunMonitor(folder)
        monitor.update()
        return monitor

    # this very process (started with the arguments in sys.argv; or known by its start time)
    assert monitor_for(pid=os.getpid(), host=HOST, argv=sys.argv).process_alive() is True
    assert monitor_for(pid=os.getpid(), host=HOST, argv=["x"]).process_alive() is True
    # a process that ran and ended
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert monitor_for(pid=ended.pid, host=HOST, argv=["mtkd"]).process_alive() is False
    # started on another machine (a run folder on a shared path), or no pid recorded
    assert monitor_for(pid=os.getpid(), host=HOST + "-other", argv=sys.argv).process_alive() is None
    assert monitor_for().process_alive() is None
    assert RunMonitor(tmp_path / "nothing").process_alive() is None

    # a running process: an engine (its command line mentions mtkd), or a reused pid (not)
    sleep = "import time; time.sleep(60)"
    engine = subprocess.Popen([sys.executable, "-c", sleep, "mtkd", "train"])
    other = subprocess.Popen([sys.executable, "-c", sleep])
    try:
        assert monitor_for(pid=engine.pid, host=HOST, argv=["x"]).process_alive() is True
        if sys.platform.startswith("linux"):
            # the pid of a run that started an hour before this process: reused since
            reused = monitor_for(pid=other.pid, host=HOST, argv=["a", "b"], time=time.time() - 3600)
            assert reused.process_alive() is False
            assert pid_alive(other.pid, ["a", "b"], started_at=time.time()) is True
        assert pid_alive(-1) is False
    finally:
        for child in (engine, other):
            child.kill()
            child.wait()
    assert pid_alive(engine.pid) is False


# ------------------------------------------------------------------------- MRML
def test_plots_hold_one_row_per_epoch_and_a_series_per_term(tmp_path):
    scene, _ = new_scene()
    log = event_log(tmp_path)
    monitor = RunMonitor(tmp_path)
    plots = RunPlots(scene, "student")
    table, losses, validation = plots.nodes()
    assert table.IsA("vtkMRMLTableNode") and losses.IsA("vtkMRMLPlotChartNode")
    assert losses.GetName() == "student losses"
    assert validation.GetName() == "student validation Dice"
    assert losses.GetXAxisTitle() == "epoch" and validation.GetYAxisTitle() == "Dice"

    start(log, epochs=6)
    records = [epoch_record(1, 6, False), epoch_record(2, 6, True)]
    for record in records:
        log.emit("metrics", **record)
    assert plots.update(monitor.update())
    assert table.GetNumberOfRows() == 2
    assert plots.columns == ["epoch", "loss", "seg", "val_dice"]

    # epochs 3 and 4, one with a new term; updating twice changes nothing the second time
    records += [
        epoch_record(3, 6, False, **{"infonce:E-E": 0.9}),
        epoch_record(4, 6, True, **{"infonce:E-E": 0.8}),
    ]
    for record in records[2:]:
        log.emit("metrics", **record)
    assert plots.update(monitor.update())
    nodes = scene.GetNumberOfNodes()
    modified = table.GetMTime()
    for _ in range(3):
        assert not plots.update(monitor.update())
    assert scene.GetNumberOfNodes() == nodes and table.GetMTime() == modified

    assert table.GetNumberOfRows() == 4
    assert plots.columns == ["epoch", "loss", "seg", "val_dice", "infonce:E-E"]
    assert column(table, "epoch") == [1, 2, 3, 4]
    for name in ("loss", "seg", "val_dice", "infonce:E-E"):
        expected = [record.get(name, math.nan) for record in records]
        assert same_numbers(column(table, name), expected), name
    assert math.isnan(column(table, "val_dice")[0]) and math.isnan(column(table, "val_dice")[2])

    series = [losses.GetNthPlotSeriesNode(i) for i in range(losses.GetNumberOfPlotSeriesNodes())]
    assert [s.GetYColumnName() for s in series] == ["loss", "seg", "infonce:E-E"]
    assert all(s.GetXColumnName() == "epoch" for s in series)
    assert all(s.GetTableNode().GetID() == table.GetID() for s in series)
    assert all(s.GetPlotType() == s.PlotTypeScatter for s in series)
    assert len({s.GetColor() for s in series}) == 3
    assert validation.GetNumberOfPlotSeriesNodes() == 1
    assert validation.GetNthPlotSeriesNode(0).GetYColumnName() == "val_dice"
    assert series_count(scene) == 4

    # a resume that repeats epoch 4 and goes on: the table is rebuilt, still one row an epoch
    log.emit("status", state="preparing", kind="distill", resume=True)
    log.emit("status", state="training", start_epoch=3, epochs=6)
    records[3] = epoch_record(4, 6, True, **{"infonce:E-E": 0.7})
    records.append(epoch_record(5, 6, False, **{"infonce:E-E": 0.6}))
    for record in records[3:]:
        log.emit("metrics", **record)
    assert plots.update(monitor.update())
    assert column(table, "epoch") == [1, 2, 3, 4, 5]
    assert same_numbers(column(table, "infonce:E-E"), [math.nan, math.nan, 0.9, 0.7, 0.6])
    assert series_count(scene) == 4

    # a new run in the same folder: its own rows only
    log.path.unlink()
    monitor.update()
    start(log, epochs=2)
    log.emit("metrics", **epoch_record(1, 2, True))
    state = monitor.update()
    assert state.generation == 1 and len(state.history) == 1
    assert plots.update(state)
    assert column(table, "epoch") == [1] and plots.columns == ["epoch", "loss", "seg", "val_dice"]
    assert series_count(scene) == 3

    plots.remove()
    assert series_count(scene) == 0
    assert scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems() == 0


def test_plots_from_a_hand_made_state_are_rebuilt_only_when_it_changes():
    scene, _ = new_scene()
    plots = RunPlots(scene, "run")
    history = [epoch_record(1, 3, True), epoch_record(2, 3, False)]
    state = RunState(state="training", history=history, loss_terms=["loss", "seg"],
                     val_metrics=["val_dice"])  # fmt: skip
    assert plots.update(state)
    copy = RunState(state="training", history=[dict(r) for r in history])  # equal, not same
    assert not plots.update(copy)
    assert plots.table.GetNumberOfRows() == 2


def node_counts(scene) -> dict[str, int]:
    classes = ("vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode",
               "vtkMRMLPlotViewNode", "vtkMRMLScriptedModuleNode")  # fmt: skip
    return {name: scene.GetNumberOfNodesByClass(name) for name in classes}


def test_reattaching_a_run_reuses_its_table_chart_and_series_nodes(tmp_path):
    """Attach, Resume or a reloaded scene make a new RunPlots for the same run folder: it takes
    over the nodes already in the scene instead of adding a table, two charts and series."""
    scene, _ = new_scene()
    log = event_log(tmp_path)
    start(log, epochs=3)
    for epoch in (1, 2):
        log.emit("metrics", **epoch_record(epoch, 3, True))
    first = RunPlots(scene, "student", key=str(tmp_path))
    first.update(RunMonitor(tmp_path).update())
    counts = node_counts(scene)
    assert counts["vtkMRMLPlotSeriesNode"] == 3  # loss, seg, val_dice
    ids = [node.GetID() for node in [*first.nodes(), *first.series.values()]]

    log.emit("metrics", **epoch_record(3, 3, True))
    for _ in range(2):  # attached twice more
        again = RunPlots(scene, "student", key=str(tmp_path))
        assert again.update(RunMonitor(tmp_path).update())
        assert node_counts(scene) == counts
        assert [node.GetID() for node in [*again.nodes(), *again.series.values()]] == ids
        assert column(again.table, "epoch") == [1, 2, 3]
        losses = again.loss_chart
        assert losses.GetNumberOfPlotSeriesNodes() == 2
        assert again.val_chart.GetNumberOfPlotSeriesNodes() == 1

    other = RunPlots(scene, "student", key=str(tmp_path / "elsewhere"))  # same name, other run
    assert other.table.GetID() not in ids
    assert node_counts(scene)["vtkMRMLTableNode"] == 2


def test_plot_view_node_is_created_once_per_widget_tag():
    scene, _ = new_scene()
    losses = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "losses")
    dice = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "dice")
    view = plot_view_node(scene, "MTKDTrain.loss", losses)
    assert view.IsA("vtkMRMLPlotViewNode") and view.GetPlotChartNodeID() == losses.GetID()
    owner = view.GetParentLayoutNode()  # shown in a module panel, not in the view layout
    assert owner is not None and owner.GetHideFromEditors()
    for _ in range(3):
        assert plot_view_node(scene, "MTKDTrain.loss", dice) is view
    assert view.GetPlotChartNodeID() == dice.GetID()
    other = plot_view_node(scene, "MTKDTrain.dice")
    assert other is not view and other.GetParentLayoutNode() is owner
    assert node_counts(scene)["vtkMRMLPlotViewNode"] == 2
    assert node_counts(scene)["vtkMRMLScriptedModuleNode"] == 1

    scene.Clear(0)  # File > Close Scene keeps singletons (reset)
    after = plot_view_node(scene, "MTKDTrain.loss")
    assert after.GetSingletonTag() == "MTKDTrain.loss"
    assert node_counts(scene)["vtkMRMLPlotViewNode"] == 2
    assert after.GetParentLayoutNode() is not None


# ------------------------------------------------------------------ real runs
def test_a_real_runs_events_followed_through_torn_lines(teacher_run, tmp_path):
    """The teacher fixture's events.jsonl, copied in pieces that end mid-line."""
    source = (teacher_run / "events.jsonl").read_bytes()
    events = read_events(teacher_run / "events.jsonl")
    copy = tmp_path / "events.jsonl"
    monitor = RunMonitor(tmp_path)
    scene, _ = new_scene()
    plots = RunPlots(scene, "teacher")
    seen = []
    for cut in range(0, len(source) + 37, 37):
        copy.write_bytes(source[:cut])  # same inode: rewritten, longer each time
        state = monitor.update()
        plots.update(state)
        if not seen or seen[-1] != state.state:
            seen.append(state.state)
    assert monitor.follower.resets == 0
    assert seen == ["waiting", "preparing", "training", "exporting", "finished"]
    metrics = [e for e in events if e["type"] == "metrics"]
    done = events[-1]
    assert [r["epoch"] for r in state.history] == [m["epoch"] for m in metrics] == [1, 2]
    assert state.loss_terms == ["loss", "seg", "reconstruction"]
    assert (state.model, state.best_val_dice, state.best_epoch) == (
        done["model"], done["best_val_dice"], done["best_epoch"]
    )  # fmt: skip
    assert state.events == len(events)
    table = plots.table
    assert table.GetNumberOfRows() == 2
    for name in ("loss", "seg", "reconstruction", "val_dice"):
        assert column(table, name) == pytest.approx([m[name] for m in metrics]), name


@pytest.mark.slow
def test_a_live_run_stopped_and_resumed(make_config, tmp_path):
    """A real tiny training in a thread, followed while it runs; stopped after its first
    epoch (as Cancel does), then resumed to the end."""
    run_dir = tmp_path / "live"
    config = RunConfig.from_dict(make_config("train", name="live", train__epochs=4))
    scene, _ = new_scene()
    monitor = RunMonitor(run_dir)
    plots = RunPlots(scene, "live")
    states: list[RunState] = []

    def follow(trainer: Trainer, stop_after_epoch: bool) -> None:
        outcome: list[BaseException] = []

        def work() -> None:
            try:
                trainer.run()
            except BaseException as error:  # reported to the test below
                outcome.append(error)

        thread = threading.Thread(target=work)
        thread.start()
        while thread.is_alive():
            state = monitor.update()
            plots.update(state)
            states.append(state)
            if stop_after_epoch and state.history and not trainer.stop.requested:
                trainer.stop.request("SIGTERM")
            time.sleep(0.005)
        thread.join()
        state = monitor.update()
        plots.update(state)
        states.append(state)
        if stop_after_epoch:
            assert len(outcome) == 1 and isinstance(outcome[0], TrainingInterrupted)
        else:
            assert not outcome, outcome

    follow(Trainer(config, run_dir, progress=False, log=lambda _: None), True)
    state = states[-1]
    assert state.state == "interrupted" and state.stopped_by == "SIGTERM"
    assert 1 <= state.epoch < 4 and state.epoch == len(state.history)
    assert format_status(state).startswith(f"stopped at epoch {state.epoch}")
    assert plots.table.GetNumberOfRows() == state.epoch
    stopped_at = state.epoch

    trainer = Trainer(config, run_dir, resume=True, progress=False, log=lambda _: None)
    follow(trainer, False)
    state = states[-1]
    assert state.state == "finished" and state.resumed and state.progress == 1.0
    events = read_events(run_dir / "events.jsonl")
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [r["epoch"] for r in state.history] == [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert column(plots.table, "epoch") == [1, 2, 3, 4]
    assert column(plots.table, "loss") == pytest.approx([m["loss"] for m in metrics])
    assert state.best_val_dice == pytest.approx(events[-1]["best_val_dice"])

    # the states seen, in order, without a step back
    names = [s.state for s in states]
    collapsed = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    expected = iter(["waiting", "preparing", "training", "interrupted", "preparing", "training",
                     "exporting", "finished"])  # fmt: skip
    assert all(name in expected for name in collapsed), collapsed  # a subsequence
    assert collapsed[-1] == "finished" and "interrupted" in collapsed
    progress = [s.progress for s in states]
    assert progress == sorted(progress)  # a resume goes on where the run stopped
    assert all(0.0 <= p <= 1.0 for p in progress)
    if stopped_at <= 2:  # an epoch after the first of the new session was seen while training
        assert any(s.eta_seconds is not None for s in states if s.epoch > stopped_at)
    # the run records its process: this one, here
    assert (state.pid, state.host, state.argv) == (os.getpid(), HOST, sys.argv)
    assert monitor.process_alive() is True
