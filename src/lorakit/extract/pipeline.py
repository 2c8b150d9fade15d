"""Overlap extraction's reads and writes with its SVDs: a reader thread runs ahead, a writer thread behind.

Both threads spend most of their time where the GIL is released (page faults and torch reductions
while the reader checks the mapped checkpoint bytes; ``write`` and ``fsync`` in the writer), so
they run beside the main thread's SVDs. Both queues are bounded: the reader is at most ``ahead``
items (plus the one in the making) ahead; at most ``limit`` bytes wait to be written. An
exception in either thread is raised again, the same object, in the main thread; leaving either
context stops and joins its thread, so nothing writes into a directory after it was removed.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Generic, TypeVar

import torch

from lorakit.io.stream import SafetensorsWriter

T = TypeVar("T")
WAKE = 1 << 20  # bytes queued before an idle writer is woken (finish() wakes it for the rest)


class Prefetch(Generic[T]):
    """``with Prefetch(items, ahead) as it: for x in it: ...`` with ``items`` consumed in a thread.

    Items come out in order; an exception raised while producing one is raised by the loop at
    that item's place.
    """

    def __init__(self, items: Iterator[T], ahead: int = 1):
        self.source, self.ahead = items, ahead
        self.ready: collections.deque[T] = collections.deque()
        self.done = self.stop = False
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="lorakit-extract-read", daemon=True)

    def _run(self) -> None:
        try:
            for item in self.source:
                with self.cond:
                    while len(self.ready) >= self.ahead and not self.stop:
                        self.cond.wait()
                    if self.stop:
                        break
                    self.ready.append(item)
                    self.cond.notify_all()
        except BaseException as e:  # handed to the main thread, raised there
            self.error = e
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def __enter__(self) -> Iterator[T]:
        self.thread.start()
        return self._iterate()

    def _iterate(self) -> Iterator[T]:
        while True:
            with self.cond:
                while not self.ready and not self.done:
                    self.cond.wait()
                if not self.ready:
                    if self.error is not None:
                        raise self.error
                    return
                item = self.ready.popleft()
                self.cond.notify_all()
            yield item

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with self.cond:
            self.stop = True
            self.ready.clear()
            self.cond.notify_all()
        self.thread.join()


class BackgroundWriter:
    """``add(name, tensor)`` queues a tensor for a :class:`SafetensorsWriter`; a thread writes them in order.

    At most ``limit`` bytes wait (or one tensor, if it alone is larger), so the caller runs ahead
    of the disk by that much and no more; an idle writer is woken once ``WAKE`` bytes wait.
    ``finish()`` waits for every queued tensor, then flushes and fsyncs the file (so the adapter
    dir's final fsync finds little left to do). A failed write is raised by the next ``add`` or by
    ``finish``.
    """

    def __init__(self, writer: SafetensorsWriter, limit: int = 256 << 20):
        self.writer, self.limit = writer, limit
        self.items: collections.deque[tuple[str, torch.Tensor, int]] = collections.deque()
        self.queued = 0  # bytes in self.items
        self.closing = self.stop = False
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="lorakit-extract-write", daemon=True)
        self.thread.start()

    def _next(self) -> tuple[str, torch.Tensor, int] | None:
        with self.cond:
            while not self.items and not self.closing and not self.stop:
                self.cond.wait()
            return None if self.stop or not self.items else self.items[0]

    def _run(self) -> None:
        try:
            while (item := self._next()) is not None:
                self.writer.add(item[0], item[1])
                with self.cond:
                    self.items.popleft()
                    self.queued -= item[2]
                    self.cond.notify_all()
            if not self.stop:
                self.writer.file.flush()
                os.fsync(self.writer.file.fileno())
        except BaseException as e:  # handed to the main thread, raised there
            self.error = e
        with self.cond:
            self.stop = True  # a failed or finished writer takes nothing more
            self.cond.notify_all()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        with self.cond:
            while self.queued and self.queued + size > self.limit and not self.stop:
                self.cond.notify_all()  # full: the writer must be awake to make room
                self.cond.wait()
            if not self.stop:
                self.items.append((name, tensor, size))
                self.queued += size
                if self.queued >= min(WAKE, self.limit):  # small tensors gather first: a wake-up costs a GIL hand-over
                    self.cond.notify_all()
                return
        self._raise()
        raise RuntimeError(f"cannot write {name}: the writer was closed")

    def finish(self) -> None:
        """Wait until every queued tensor is written and synced; raise a write's error if one failed."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join()
        self._raise()

    def halt(self) -> None:
        """Drop what is queued and wait for the write in progress, if any, to end."""
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.finish()
        else:
            self.halt()
