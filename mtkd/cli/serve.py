"""``mtkd serve``: a long-lived engine process that runs ``segment``, ``compare`` and
``evaluate`` jobs.

Front ends that segment again and again (in Slicer: MTKD Segment's Apply and Compare, and
MTKD Train's scoring of each version of the annotate-then-distill loop) start it once and
send it jobs, instead of paying a new process, the torch and MONAI imports and the model
loading on every job. Loaded models are kept between jobs (:mod:`mtkd.modelfiles.cache`):
keyed by the resolved model path and the device, and loaded again when the model's files
change (sizes or modification times).

Protocol: JSON, one object per line, on stdin (requests) and stdout (replies); nothing else
is written to stdout (what a job or a native library prints goes to the replies or to
stderr). Once started, the worker says::

    {"ready": true, "pid": 1234, "version": "0.5.0"}

Requests:

- ``{"id": "j1", "argv": ["segment", MODEL, IMAGE, "-o", OUT, "--device", "auto",
  "--progress"]}``: a job, exactly an ``mtkd segment``, ``mtkd compare`` or ``mtkd evaluate``
  command line (nothing else is accepted: training stays a process of its own). ``id`` is
  the client's name for it (a string or an integer). Jobs run one at a time, in the order
  they came.
- ``{"cancel": "j1"}``: cancel that job: a waiting job never runs; a running one stops at its
  next stage boundary (:mod:`mtkd.infer.stages`), so whatever it was writing is finished or
  not begun. A job that has ended, or an unknown id, is ignored. The worker stays alive.
- ``{"quit": true}``: end the worker once the jobs already sent have ended. The end of stdin
  also ends it, cancelling what runs (the client is gone).

Replies to a job:

- ``{"id": "j1", "line": "..."}`` for every line the job prints (stdout and stderr, in order;
  ``MTKD-PROGRESS`` lines included, see :mod:`mtkd.progress`);
- then one ``{"id": "j1", "done": STATUS, ...}``. ``STATUS`` is the exit status that
  ``mtkd`` would give for the same command line: 0 success; 2 an error the user can fix (a
  bad model path or command line...); 1 an unexpected error; 130 cancelled (then also
  ``"cancelled": true``). When it is not 0, ``"error"`` says what went wrong (naming the
  file, as ``mtkd: error:`` does). ``"models_loaded"``: the models this job read from disk;
  ``"models_reused"``: those it took from the cache; ``"seconds"``: the job's run time.

A request that cannot be understood gets ``{"id": ID, "done": 2, "error": "..."}`` when its
id could be read (an unknown subcommand, an ``argv`` that is not a list of strings, an id
already in use), else ``{"id": null, "error": "..."}`` (a line that is not a JSON object); the
worker goes on with the next request. The worker's exit status is 0 after ``quit`` or the end
of stdin.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

DEFAULT_MODELS_KEPT = 3


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``mtkd`` subcommands."""
    sub = commands.add_parser(
        "serve",
        help="a long-lived worker that runs segment/compare/evaluate jobs sent as JSON lines "
        "on stdin (for the Slicer modules)",
    )
    sub.add_argument(
        "--models",
        type=int,
        default=DEFAULT_MODELS_KEPT,
        metavar="N",
        help=f"how many loaded models to keep between jobs (default {DEFAULT_MODELS_KEPT})",
    )
    sub.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from mtkd.cli.serving.server import Server
    from mtkd.errors import MTKDError
    from mtkd.modelfiles.cache import ModelCache

    if args.models < 1:
        raise MTKDError(f"--models must be at least 1, not {args.models}")
    requests, replies = protocol_streams()
    cache = ModelCache(args.models)
    status = Server(requests, replies, cache).serve()
    if any(thread.is_alive() for thread in cache.preparing_threads):
        # a model still being prepared in a thread: end without it (the interpreter's
        # teardown would abort the process under the running export)
        replies.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def protocol_streams() -> tuple[TextIO, TextIO]:
    """This process's stdin and stdout, kept for the protocol alone: their file descriptors
    are duplicated for it, then descriptor 0 reads from the null device and 1 writes to
    stderr, so that nothing a job, a library or a child process reads or prints (Python or
    native code) can take a request or garble a reply."""
    sys.stdout.flush()
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8", errors="replace")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8", newline="\n")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return requests, replies
