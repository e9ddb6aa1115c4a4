"""Loaded models kept for the next job of a long-lived process (``mtkd serve``).

A model is reused while nothing about it changed: the key is the resolved source path and
the device, and an entry is only used while the source's files have the sizes and
modification times they had when it was loaded (a retrained or re-exported model is loaded
again). The least recently used model goes first when more than ``capacity`` are held.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from mtkd.modelfiles.model_io import LoadedModel
from mtkd.modelfiles.sources import load_any_model

# (source, device, prepare=..., variant=...) -> the model; ``prepare`` turns a freshly loaded
# model into the one kept (e.g. its network on another backend), ``variant`` names that result
ModelLoader = Callable[..., LoadedModel]
Prepare = Callable[[LoadedModel], LoadedModel]
FileStamp = tuple[tuple[str, int, int], ...]


def files_stamp(path: Path) -> FileStamp | None:
    """(relative name, size, modification time in ns) of the file ``path`` or of every file
    under the folder ``path``, sorted; None when ``path`` does not exist."""
    try:
        if path.is_file():
            stat = path.stat()
            return ((path.name, stat.st_size, stat.st_mtime_ns),)
        if not path.is_dir():
            return None
        stamp = []
        for file in sorted(path.rglob("*")):
            if file.is_file():
                stat = file.stat()
                stamp.append((file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
        return tuple(stamp)
    except OSError:  # changed while being read: not reusable
        return None


class ModelCache:
    """Loads models with ``loader`` (default: any source :func:`load_any_model` opens) and
    keeps up to ``capacity`` of them. ``loads`` and ``hits`` count the models loaded from
    disk and those given from the cache."""

    def __init__(self, capacity: int = 3, loader: ModelLoader = load_any_model):
        if capacity < 1:
            raise ValueError("a model cache holds at least one model")
        self.capacity = capacity
        self.loader = loader
        self.loads = 0
        self.hits = 0
        self._entries: OrderedDict[tuple[str, str, str], tuple[FileStamp, LoadedModel]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self._preparing: set = set()  # (key, stamp) prepared, or being prepared, in a thread
        self.preparing_threads: list[threading.Thread] = []

    def __len__(self) -> int:
        return len(self._entries)

    def load(
        self,
        source: str | Path,
        device: torch.device | str,
        prepare: Prepare | None = None,
        variant: str = "",
        background: bool = False,
    ) -> LoadedModel:
        """The model of ``source`` on ``device`` (passed through ``prepare`` when given, and
        kept apart per ``variant``): the cached one when its files are unchanged, else
        loaded now (errors are the loader's and ``prepare``'s, and nothing is cached).

        ``background``: until the prepared model is ready, give the plain one (``variant``
        "") and prepare it in a thread (once; a failure leaves the plain one in use)."""
        path = Path(source).expanduser()
        key = (str(path.resolve()), str(torch.device(device)), variant)
        stamp = files_stamp(path)
        cached = self._cached(key, stamp)
        if cached is not None:
            return cached
        if background and prepare is not None:
            plain = self.load(source, device)
            self._prepare_later(key, stamp, plain, prepare)
            return plain
        model = self.loader(source, torch.device(device))
        if prepare is not None:
            model = prepare(model)
        with self._lock:
            self.loads += 1
            if stamp is not None and stamp == files_stamp(path):  # not changed while loading
                self._keep(key, stamp, model)
        return model

    def _cached(self, key: tuple[str, str, str], stamp: FileStamp | None) -> LoadedModel | None:
        """The entry of ``key`` if its files still have ``stamp`` (a changed one is dropped)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and stamp is not None and entry[0] == stamp:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            self._entries.pop(key, None)  # changed on disk: the old network goes
        return None

    def _keep(self, key: tuple[str, str, str], stamp: FileStamp, model: LoadedModel) -> None:
        """Store ``model`` (under the lock), dropping the least recently used beyond capacity."""
        self._entries[key] = (stamp, model)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def _prepare_later(
        self, key: tuple[str, str, str], stamp: FileStamp | None, plain: LoadedModel, prepare
    ) -> None:
        """Prepare a copy of ``plain`` in a daemon thread and keep it under ``key``."""
        with self._lock:
            if stamp is None or (key, stamp) in self._preparing:
                return
            self._preparing.add((key, stamp))

        def work() -> None:
            try:
                model = prepare(dataclasses.replace(plain, network=copy.deepcopy(plain.network)))
            except Exception:  # noqa: BLE001 - the plain model stays in use
                return
            with self._lock:
                if stamp == files_stamp(Path(key[0])):
                    self._keep(key, stamp, model)

        thread = threading.Thread(target=work, name="mtkd-prepare-model", daemon=True)
        self.preparing_threads.append(thread)
        thread.start()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
