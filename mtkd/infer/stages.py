"""The named stages of a segmentation, and who watches them.

The pipeline marks its stages with ``with stage("network"):`` (reading, resampling, the
network, mapping back, ...). Nothing happens unless an observer is watching in the current
thread (:func:`watching`): :class:`StageTimes` adds up the seconds spent in each stage (time in
a nested stage counts for the inner one only), and a cancellation check
(:class:`CancelCheck`) stops the job at the next stage boundary. Marks cost a context-variable
lookup when no one watches.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import torch


class StageObserver(Protocol):
    """Told when a stage begins and ends (in the thread that runs it)."""

    def begin(self, name: str) -> None: ...

    def end(self, name: str) -> None: ...


_OBSERVERS: contextvars.ContextVar[tuple[StageObserver, ...]] = contextvars.ContextVar(
    "mtkd_stage_observers", default=()
)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark a stage of the pipeline for the observers watching this thread."""
    observers = _OBSERVERS.get()
    if not observers:
        yield
        return
    begun: list[StageObserver] = []
    try:
        for observer in observers:
            observer.begin(name)  # a cancellation check may raise here
            begun.append(observer)
        yield
    finally:
        for observer in reversed(begun):
            observer.end(name)


@contextlib.contextmanager
def watching(*observers: StageObserver) -> Iterator[None]:
    """Let ``observers`` see the stages run in this thread until the block ends."""
    token = _OBSERVERS.set(_OBSERVERS.get() + observers)
    try:
        yield
    finally:
        _OBSERVERS.reset(token)


class StageTimes:
    """Seconds per stage, exclusive of nested stages, and how often each ran.

    ``synchronize``: wait for the CUDA device at every stage boundary (asynchronous kernels
    would otherwise be counted in whichever stage waits for them). Time outside any stage
    inside :meth:`total` counts as ``"other"``. ``clock``: seconds now (default
    ``time.perf_counter``).
    """

    def __init__(self, synchronize: bool = False, clock: Callable[[], float] | None = None):
        self.synchronize = synchronize and torch.cuda.is_available()
        self.clock = clock or time.perf_counter
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[str] = []
        self._since = 0.0

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return self.clock()

    def _charge(self, now: float) -> None:
        name = self._stack[-1] if self._stack else "other"
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
        self._since = now

    def begin(self, name: str) -> None:
        self._charge(self._now())
        self._stack.append(name)
        self.calls[name] = self.calls.get(name, 0) + 1

    def end(self, name: str) -> None:
        self._charge(self._now())
        self._stack.pop()

    @contextlib.contextmanager
    def total(self) -> Iterator[None]:
        """Watch the block, counting its time outside any stage as ``"other"``."""
        self._since = self._now()
        with watching(self):
            try:
                yield
            finally:
                self._charge(self._now())

    def table(self) -> list[tuple[str, float, int]]:
        """(stage, seconds, calls), slowest first."""
        rows = [(name, s, self.calls.get(name, 0)) for name, s in self.seconds.items()]
        return sorted(rows, key=lambda row: -row[1])


class Cancelled(Exception):
    """The job was cancelled at a stage boundary."""


class CancelCheck:
    """Raises :class:`Cancelled` when a stage begins after ``event`` was set (from any
    thread)."""

    def __init__(self, event: threading.Event | None = None):
        self.event = event or threading.Event()

    def begin(self, name: str) -> None:
        if self.event.is_set():
            raise Cancelled(f"cancelled before {name}")

    def end(self, name: str) -> None:
        """Nothing: a stage that has begun runs to its end."""
