"""Data-parallel training with torch.distributed on the CPU (gloo): the shards of an epoch,
two real processes that stay synchronised, and ``torchrun -m mtkd`` end to end (run folder
written once by rank 0, different data per rank, stop and resume)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from helpers import NETWORK_CASES, network_case_id, stop_at_batch

from mtkd.config import RunConfig
from mtkd.engine.distributed import Distributed, shard_indices
from mtkd.engine.seg_loss import SegmentationLoss
from mtkd.engine.step import TrainingStep
from mtkd.errors import MTKDError
from mtkd.modelfiles.checkpoint import load_checkpoint
from mtkd.models import build_network, network_info
from mtkd.run_folder import read_events

# --- shards and the environment ---------------------------------------------------------------


@pytest.mark.parametrize(("count", "world_size"), [(10, 2), (11, 2), (7, 3), (2, 4), (1, 2)])
def test_shards_are_disjoint_of_equal_length_and_cover_the_epoch(count, world_size):
    shards = [shard_indices(count, 5, rank, world_size) for rank in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1  # every rank runs the same steps
    everything = [index for shard in shards for index in shard]
    assert set(everything) == set(range(count))
    assert len(everything) - count == -count % world_size  # only the padding repeats
    assert shard_indices(count, 5, 0, 1) == shard_indices(count, 5, 0, 1)  # seeded
    if count > 2:
        assert shard_indices(count, 5, 0, 1) != shard_indices(count, 6, 0, 1)


def test_the_torchrun_environment_is_read_and_checked():
    alone = Distributed.from_environment({})
    assert (alone.rank, alone.world_size, alone.enabled, alone.is_main) == (0, 1, False, True)
    second = Distributed.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (second.rank, second.local_rank, second.enabled, second.is_main) == (3, 1, True, False)
    assert alone.any(True, torch.device("cpu")) and not alone.any(False, torch.device("cpu"))
    assert alone.sum({"a": 2.0}, torch.device("cpu")) == {"a": 2.0}
    assert alone.gather([1, 2]) == [[1, 2]]
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(MTKDError, match="RANK|WORLD_SIZE"):
            Distributed.from_environment(bad)
    with pytest.raises(MTKDError, match="local rank"):
        second.device(torch.device("cuda", 0))


@pytest.mark.parametrize("case", NETWORK_CASES, ids=network_case_id)
def test_every_trainable_parameter_gets_a_gradient(case):
    """DDP is built without searching for unused parameters: every registered network must
    use all of its parameters in a training step (else DDP fails at the second step)."""
    name, params, shape = case
    torch.manual_seed(0)
    out_channels = network_info(name, **params).params["out_channels"]
    activation = "sigmoid" if out_channels == 1 else "softmax"
    step = TrainingStep(
        build_network(name, **params),
        SegmentationLoss("dice_ce", activation),
        seg_weight=1.0,
        activation=activation,
    )
    labels = torch.randint(0, max(out_channels, 2), (shape[0], 1, *shape[2:]))
    loss, terms = step(torch.randn(shape), labels)
    loss.backward()
    assert set(terms) == {"seg"}
    unused = [n for n, p in step.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


# --- two processes, in this test ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_as_rank(rank: int, world_size: int, port: int, config: dict, folder: str) -> None:
    """One process of a torch.distributed run (started by mp.start_processes)."""
    from mtkd.engine.trainer import Trainer

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    trainer = Trainer(RunConfig.from_dict(config), Path(folder) / "run", progress=False)
    trainer.run()
    if rank == 1:  # rank 0 exported the best epoch's weights and holds those now
        parameters = {
            **{f"model.{k}": v for k, v in trainer.models.network.named_parameters()},
            **{
                f"connectors.{k}": v
                for k, v in trainer.models.distiller.connectors.named_parameters()
            },
        }
        torch.save({k: v.detach() for k, v in parameters.items()}, Path(folder) / "rank1.pt")


@pytest.mark.slow
def test_two_gloo_processes_distil_in_step(teacher_run, make_config, tmp_path):
    """Two processes distil with InfoNCE connectors and PMD: the student's and the connectors'
    parameters of rank 1 at the end are those of the checkpoint rank 0 wrote, and rank 0 alone
    wrote the run folder."""
    config = make_config(
        "distill",
        model={"name": "thesis_s1", "params": {}},
        train_on="student_train",
        distill={"teacher": str(teacher_run), "preset": "thesis"},
        train__epochs=2,
    )
    mp.start_processes(
        _train_as_rank,
        args=(2, _free_port(), config, str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["world_size"] == 2 and last["epoch"] == 2
    written = {
        **{f"model.{k}": v for k, v in last["model"].items()},
        **{f"connectors.{k}": v for k, v in last["connectors"].items()},
    }
    assert any(key.startswith("connectors.") for key in rank1)
    assert [key for key in rank1 if not torch.equal(rank1[key], written[key])] == []
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert [e["epoch"] for e in events if e["type"] == "metrics"] == [1, 2]
    assert sum(e["type"] == "done" for e in events) == 1


# --- torchrun -m mtkd ----------------------------------------------------------------------------


def _torchrun(*args: str) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "mtkd", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
    )


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _wait_for_event(events: Path, kind: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["type"] == kind for e in read_events(events)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no '{kind}' event within {timeout} s")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model" / "model.pt", weights_only=True)


@pytest.mark.slow
def test_torchrun_trains_on_two_shards_and_resumes_after_a_stop(make_config, tmp_path):
    """``torchrun --nproc_per_node 2 -m mtkd train``: one run folder written by rank 0, each
    rank on its own half of every epoch, metrics over both; stopped by SIGTERM, the run resumes
    under torchrun and ends with the weights of the run that was never stopped."""
    config = make_config("train", train__epochs=3, train__batch_size=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    straight = tmp_path / "straight"
    code, output = _finish(_torchrun("train", str(path), "--run-dir", str(straight)))
    assert code == 0, output[-3000:]
    assert output.count("finished:") == 1  # rank 0 reports, rank 1 does not
    events = read_events(straight / "events.jsonl")
    assert [e["epoch"] for e in events if e["type"] == "metrics"] == [1, 2, 3]
    assert sum(e["type"] == "done" for e in events) == 1
    training = next(e for e in events if e.get("state") == "training")
    assert training["world_size"] == 2
    samples = training["train_samples"]
    shards = [e for e in events if e["type"] == "shards"]
    assert [e["epoch"] for e in shards] == [1, 2, 3]
    for event in shards:
        first, second = map(set, event["samples"])
        assert first and second and not first & second  # different data on each rank
        assert first | second == set(range(samples))  # the whole epoch between them
    assert shards[0]["samples"] != shards[1]["samples"]  # reshuffled every epoch
    metrics = [e for e in events if e["type"] == "metrics"]
    for event, shard in zip(metrics, shards):  # counted over both ranks (full batches of 2)
        assert event["samples"] == sum(len(part) // 2 * 2 for part in shard["samples"])
    assert (straight / "model" / "model.pt").is_file()
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["best.pt", "last.pt"]

    stopped = tmp_path / "stopped"
    process = _torchrun("train", str(path), "--run-dir", str(stopped))
    _wait_for_event(stopped / "events.jsonl", "metrics")
    process.send_signal(signal.SIGTERM)
    code, output = _finish(process)
    assert code != 0
    events = read_events(stopped / "events.jsonl")
    assert any(e.get("state") == "interrupted" for e in events), output[-3000:]
    assert not (stopped / "model").exists()
    state = load_checkpoint(stopped / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and state["epoch"] < 3

    code, output = _finish(_torchrun("train", "--resume", str(stopped)))
    assert code == 0, output[-3000:]
    a, b = _weights(straight), _weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_mid_epoch_checkpoint_of_another_process_count_restarts_its_epoch(make_config, tmp_path):
    """A checkpoint saved in the middle of an epoch by 2 processes, resumed by 1: the shard
    it stopped in no longer exists, so that epoch starts again from its beginning."""
    from mtkd.engine.trainer import Trainer, TrainingInterrupted, resume_run
    from mtkd.modelfiles.checkpoint import save_checkpoint

    config = RunConfig.from_dict(make_config("train", train__epochs=2))
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lambda _: None)
    stop_at_batch(trainer, 3)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 3)
    save_checkpoint({**state, "world_size": 2}, last)

    messages = []
    resume_run(tmp_path / "run", progress=False, log=messages.append)
    assert any("starts again from its beginning" in m for m in messages)
    resumed = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["type"] == "metrics"]
    assert [e["epoch"] for e in resumed] == [1, 2]
    assert (
        resumed[0]["samples"]
        == next(
            e["train_samples"]
            for e in read_events(tmp_path / "run" / "events.jsonl")
            if e.get("state") == "training"
        )
        // 4
        * 4
    )  # the whole first epoch (full batches of 4), not its last steps only
