"""The loop of ``mtkd serve``: a reader thread takes requests as they come (so that a cancel
reaches a running job), and the calling thread runs the jobs, one at a time, in order."""

from __future__ import annotations

import os
import queue
import threading
from typing import TextIO

import mtkd
from mtkd.cli.serving.channel import (
    CancelRequest,
    JobId,
    JobRequest,
    QuitRequest,
    ReplyWriter,
    RequestError,
    parse_request,
)
from mtkd.cli.serving.jobs import JobEnd, cancelled_end, run_job
from mtkd.modelfiles.cache import ModelCache


class Server:
    """Requests read from ``requests``, replies written to ``replies`` (see
    :mod:`mtkd.cli.serve`), models kept in ``cache``."""

    def __init__(self, requests: TextIO, replies: TextIO, cache: ModelCache):
        self.requests = requests
        self.replies = ReplyWriter(replies)
        self.cache = cache
        self._jobs: queue.Queue[JobRequest | None] = queue.Queue()  # None: end
        self._lock = threading.Lock()
        self._cancels: dict[JobId, threading.Event] = {}  # the jobs not yet ended

    def serve(self) -> int:
        """Run jobs until ``quit`` or the end of the requests; the exit status (0)."""
        self.replies.send(ready=True, pid=os.getpid(), version=mtkd.__version__)
        threading.Thread(target=self._read, name="mtkd serve requests", daemon=True).start()
        while (job := self._jobs.get()) is not None:
            self._run(job)
        return 0

    def _run(self, job: JobRequest) -> None:
        def emit(line: str) -> None:
            self.replies.send(id=job.job_id, line=line)

        with self._lock:
            cancel = self._cancels[job.job_id]
        try:
            end = (
                cancelled_end() if cancel.is_set() else run_job(job.argv, self.cache, cancel, emit)
            )
        finally:
            with self._lock:
                del self._cancels[job.job_id]
        self.replies.send(id=job.job_id, **_done_fields(end))

    def _read(self) -> None:
        """Take requests until the end of the stream, then cancel what is left and end."""
        for number, line in enumerate(self.requests, start=1):
            if not line.strip():
                continue
            try:
                request = parse_request(line)
                self._take(request)
            except RequestError as error:
                self._refuse(error, number)
                continue
            if isinstance(request, QuitRequest):
                self._jobs.put(None)
                return
        with self._lock:  # the client has gone: nobody waits for the jobs
            for cancel in self._cancels.values():
                cancel.set()
        self._jobs.put(None)

    def _take(self, request: JobRequest | CancelRequest | QuitRequest) -> None:
        if isinstance(request, CancelRequest):
            with self._lock:
                cancel = self._cancels.get(request.job_id)
            if cancel is not None:  # an ended or unknown job: nothing to do
                cancel.set()
        elif isinstance(request, JobRequest):
            with self._lock:
                if request.job_id in self._cancels:
                    raise RequestError(
                        f"the id {request.job_id!r} is already used by a job that has not ended",
                        request.job_id,
                    )
                self._cancels[request.job_id] = threading.Event()
            self._jobs.put(request)

    def _refuse(self, error: RequestError, number: int) -> None:
        if error.job_id is None:
            self.replies.send(id=None, error=f"request line {number}: {error}")
        else:
            self.replies.send(id=error.job_id, done=2, error=str(error))


def _done_fields(end: JobEnd) -> dict:
    fields = {
        "done": end.status,
        "models_loaded": end.models_loaded,
        "models_reused": end.models_reused,
        "seconds": round(end.seconds, 3),
    }
    if end.status != 0:
        fields["error"] = end.error or f"exit status {end.status}"
    if end.cancelled:
        fields["cancelled"] = True
    return fields
