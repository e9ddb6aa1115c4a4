"""The JSON-lines channel of ``mtkd serve``: requests parsed, replies written (the protocol is
described in :mod:`mtkd.cli.serve`)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, TextIO

JOB_COMMANDS = ("segment", "compare", "evaluate")
JobId = str | int


class RequestError(Exception):
    """A request the worker cannot take; ``job_id``: its id when it could be read."""

    def __init__(self, message: str, job_id: JobId | None = None):
        super().__init__(message)
        self.job_id = job_id


@dataclass(frozen=True)
class JobRequest:
    """Run ``argv`` (an ``mtkd segment``, ``compare`` or ``evaluate`` command line)."""

    job_id: JobId
    argv: tuple[str, ...]


@dataclass(frozen=True)
class CancelRequest:
    job_id: JobId


@dataclass(frozen=True)
class QuitRequest:
    """End once the jobs already sent have ended."""


Request = JobRequest | CancelRequest | QuitRequest


def _job_id(value: Any) -> JobId | None:
    valid = isinstance(value, str | int) and not isinstance(value, bool) and value != ""
    return value if valid else None


def parse_request(line: str) -> Request:
    """The request on one line; :class:`RequestError` saying what is wrong with it."""
    try:
        data = json.loads(line)
    except ValueError as error:
        raise RequestError(f"not JSON ({error})") from None
    if not isinstance(data, dict):
        raise RequestError(f"a request is a JSON object, not {type(data).__name__}")
    if data.get("quit") is True:
        return QuitRequest()
    if "cancel" in data:
        job_id = _job_id(data["cancel"])
        if job_id is None:
            raise RequestError('"cancel" takes the id of a job (a string or an integer)')
        return CancelRequest(job_id)
    if "argv" not in data:
        raise RequestError('a request has "argv" (with an "id"), "cancel" or "quit"')
    job_id = _job_id(data.get("id"))
    if job_id is None:
        raise RequestError('a job needs an "id" (a non-empty string or an integer)')
    argv = data["argv"]
    if not isinstance(argv, list) or not all(isinstance(word, str) for word in argv):
        raise RequestError('"argv" must be a list of strings (an mtkd command line)', job_id)
    if not argv or argv[0] not in JOB_COMMANDS:
        command = argv[0] if argv else ""
        raise RequestError(
            f"'{command}' is not a job the worker runs: argv must start with "
            f"{', '.join(JOB_COMMANDS[:-1])} or {JOB_COMMANDS[-1]}",
            job_id,
        )
    return JobRequest(job_id, tuple(argv))


class ReplyWriter:
    """Writes replies, one JSON object per line, from any thread. Once the reader has gone
    (a broken pipe), replies are dropped: the worker is ending anyway."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.closed = False
        self._lock = threading.Lock()

    def send(self, **fields: Any) -> None:
        line = json.dumps(fields) + "\n"
        with self._lock:
            if self.closed:
                return
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):  # the client closed its end
                self.closed = True
