"""One job of ``mtkd serve``: an ``mtkd segment``, ``compare`` or ``evaluate`` command line run
in this process, as the command would run it, with its output relayed line by line and its
models from the worker's cache."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mtkd.cli import inference
from mtkd.cli.serving.channel import JOB_COMMANDS
from mtkd.cli.serving.relay import LineRelay
from mtkd.errors import MTKDError
from mtkd.infer.stages import CancelCheck, Cancelled, stage, watching
from mtkd.modelfiles.cache import ModelCache

CANCELLED_STATUS = 130  # as `mtkd` interrupted


@dataclass
class JobEnd:
    """How a job ended: ``mtkd``'s exit status for it, and what went wrong if it failed."""

    status: int
    error: str | None = None
    cancelled: bool = False
    models_loaded: int = 0
    models_reused: int = 0
    seconds: float = 0.0


def job_parser() -> argparse.ArgumentParser:
    """The ``mtkd`` parser of the jobs' subcommands (the same as the command line's)."""
    parser = argparse.ArgumentParser(prog="mtkd")
    inference.add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def cancelled_end() -> JobEnd:
    return JobEnd(CANCELLED_STATUS, "cancelled", cancelled=True)


def run_job(
    argv: tuple[str, ...] | list[str],
    cache: ModelCache,
    cancel: threading.Event,
    emit: Callable[[str], None],
) -> JobEnd:
    """Run ``argv`` (``segment ...``, ``compare ...`` or ``evaluate ...``): what it prints
    goes to ``emit`` line by line; it stops at the next stage boundary once ``cancel`` is set."""
    if not argv or argv[0] not in JOB_COMMANDS:
        raise ValueError(f"not a job of the worker: {list(argv)}")
    started, loads, hits = time.perf_counter(), cache.loads, cache.hits

    def load_model(source, device, prepare=None, variant="", background=False):
        with stage("loading the model"):
            return cache.load(source, device, prepare, variant, background)

    out, err = LineRelay(emit), LineRelay(emit)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        end = _run(list(argv), load_model, cancel, err)
        out.finish()
        err.finish()
    end.models_loaded, end.models_reused = cache.loads - loads, cache.hits - hits
    end.seconds = time.perf_counter() - started
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # give back what the job's tensors held between jobs
    return end


def _run(argv: list[str], load_model, cancel: threading.Event, err: LineRelay) -> JobEnd:
    """The job, with the command line's error handling (``mtkd.cli.main``), on the streams
    already redirected; warnings are shown as in a fresh process."""
    try:
        with warnings.catch_warnings(), watching(CancelCheck(cancel)):
            if cancel.is_set():
                return cancelled_end()
            args = job_parser().parse_args(argv)
            return JobEnd(args.func(args, load_model=load_model))
    except Cancelled:
        return cancelled_end()
    except MTKDError as error:
        print(f"mtkd: error: {error}", file=sys.stderr)
        return JobEnd(2, str(error))
    except SystemExit as exit_:  # argparse: a bad command line (or --help)
        status = exit_.code if isinstance(exit_.code, int) else 2
        err.finish()
        said = [line for line in err.recent if ": error: " in line]
        reason = said[-1].split(": error: ", 1)[1] if said else f"exit status {status}"
        return JobEnd(status, None if status == 0 else f"bad command line: {reason}")
    except Exception as error:  # noqa: BLE001 - the worker outlives a failed job
        traceback.print_exc()
        return JobEnd(1, f"{type(error).__name__}: {error}")
