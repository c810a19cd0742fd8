"""Small concurrency helpers for per-process derived state: a readers-writer lock and an LRU cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ReadWriteLock:
    """Many concurrent readers or one writer; a waiting writer blocks new readers (no writer starvation).

    Used for the FAISS index: searches run concurrently, catch-up mutates it alone.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class VersionedLRU(Generic[K, V]):
    """A thread-safe LRU whose entries carry the version (change number) they were computed from.

    A hit counts only if the caller's current version matches, so an update made by any process
    invalidates the entry as soon as the caller sees the new version in the database.
    """

    def __init__(self, max_entries: int):
        self.max_entries = max(0, int(max_entries))
        self._data: OrderedDict[K, tuple[int, V]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: K, version: int) -> V | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None or entry[0] != version:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: K, version: int, value: V) -> None:
        if not self.max_entries:
            return
        with self._lock:
            old = self._data.get(key)
            if old is not None and old[0] > version:  # a slower thread must not overwrite a newer entry
                return
            self._data[key] = (version, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def invalidate(self, key: K) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
