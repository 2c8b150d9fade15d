"""Adapters by name: a persisted registry, RAM-resident factors, and slots lent out with LRU eviction.

``register`` reads an adapter once into RAM as plain factors (any method with ``to_lora``, via the
loader the engine gives); ``acquire`` puts it into a slot of the :class:`SlotBank` when a request
needs it, evicting the least recently used slot nobody is using; ``release`` ends that use. The
registry is saved atomically as ``registry.json`` in ``state_dir`` (format and damage handling in
``serve/registry_file.py``), so a restarted server knows its adapters.

A registered adapter that cannot be served (its folder is missing or fails to load at start, or
the server refuses its path) stays registered as *unavailable*, with the reason, and is never
dropped from ``registry.json`` for it: :meth:`AdapterCache.revive` looks at its folder again (at
most once per ``RETRY_S`` per name, and loads it only when the folder's files changed), so it is
served again once its folder is back. All methods are thread-safe.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import ConfigError
from lorakit.io.adapter import CONFIG_NAME
from lorakit.serve import registry_file
from lorakit.serve.registry_file import check_name
from lorakit.serve.slots import Factors, SlotBank

log = logging.getLogger("lorakit.serve")
RETRY_S = 1.0  # an unavailable adapter's folder is looked at again at most this often


class SlotsFull(RuntimeError):
    """Every slot is in use by running requests; the caller waits for one to finish."""


@dataclass
class Stats:
    loads: int = 0  # adapters copied into a slot
    evictions: int = 0  # slots taken from a resident adapter to serve another
    requests: collections.Counter[str] = field(default_factory=collections.Counter)


FolderState = tuple[tuple[str, int, int], ...]  # (file name, size, mtime_ns) of each file of an adapter dir


@dataclass
class Unavailable:
    """A registered adapter that cannot be served now: its dir, why, and when to look at it again."""

    path: str
    reason: str
    retry: bool = True  # False: refused by this server's settings (a path outside --adapters), never retried
    next_try: float = 0.0  # time.monotonic() before which its folder is not looked at again
    seen: FolderState | None = None  # its files when a load last failed: while unchanged, not loaded again


def folder_state(path: Path) -> FolderState | None:
    """The files of the adapter dir ``path`` with their sizes and times; None when it holds no adapter."""
    try:
        if not (path / CONFIG_NAME).is_file():
            return None
        with os.scandir(path) as entries:
            return tuple(sorted((e.name, (s := e.stat()).st_size, s.st_mtime_ns) for e in entries if e.is_file()))
    except OSError:
        return None


def public(text: str, path: str, root: Path | None) -> str:
    """``text`` with the adapter dir ``path`` written relative to ``root`` when inside it, else as its folder
    name, and any other path inside ``root`` relative to it: clients never see the server's absolute paths."""
    p = Path(path)
    inside = [q for q in (p.absolute(), p.resolve()) if root is not None and q.is_relative_to(root)]
    short = str(inside[0].relative_to(root)) if inside and root is not None else p.name
    for long in sorted({path, str(p.absolute()), str(p.resolve())}, key=len, reverse=True):
        text = text.replace(long, short)
    return text if root is None else text.replace(f"{root}{os.sep}", "")


class AdapterCache:
    """Registered adapters (resident in RAM, or unavailable with a reason) and their slots in ``bank``."""

    def __init__(self, bank: SlotBank, loader: Callable[[Path], Factors], state_dir: str | Path | None = None):
        self.bank, self.loader = bank, loader
        self.state_file = Path(state_dir) / registry_file.FILE_NAME if state_dir is not None else None
        self.paths: dict[str, str] = {}  # served: name -> dir ("<...>": given as factors, not saved)
        self.factors: dict[str, Factors] = {}
        self.unavailable: dict[str, Unavailable] = {}  # registered, not served now
        self.removed: set[str] = set()  # deleted names the start-up scan must not register again
        self.scan_root: Path | None = None  # the folder the start-up scan registers (``register_adapter_dir``)
        self.slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order: oldest first
        self.pins: collections.Counter[str] = collections.Counter()
        self.free = list(range(bank.max_slots - 1, -1, -1))
        self.stats = Stats()
        self.lock = threading.RLock()

    def restore(self) -> list[str]:
        """Re-register what ``registry.json`` lists; returns the names that are unavailable (each logged).

        First removes the temp files of writes a killed server left; a damaged registry is a
        ConfigError that says how to recover (``serve/registry_file.py``).
        """
        if self.state_file is None:
            return []
        for tmp in registry_file.clean(self.state_file):
            log.info("removed %s, left by a registry write that was cut off", tmp)
        saved = registry_file.read(self.state_file)
        with self.lock:
            self.removed = set(saved.removed)
        for name, path in saved.adapters.items():
            state = folder_state(Path(path))
            factors, why = self._attempt(path, state)
            if factors is not None:
                self.register(name, path, persist=False, factors=factors)
                continue
            with self.lock:
                self.unavailable[name] = Unavailable(path, why, next_try=time.monotonic() + RETRY_S, seen=state)
            log.warning("adapter %r is unavailable: %s", name, why)
        return sorted(self.unavailable)

    def _attempt(self, path: str, state: FolderState | None) -> tuple[Factors | None, str]:
        """(the factors of the adapter at ``path``, "") or (None, why it cannot be loaded)."""
        if state is None:
            return None, f"its folder {path} is missing (or has no {CONFIG_NAME}); it is served again once it is back"
        try:
            return self.loader(Path(path)), ""
        except Exception as e:  # noqa: BLE001 - a broken adapter is unavailable, it never stops the server
            return None, f"{path} cannot be loaded ({e}); it is served again once its files are fixed"

    def register(self, name: str, path: str | Path, *, persist: bool = True, factors: Factors | None = None) -> None:
        """Read the adapter at ``path`` into RAM under ``name`` (replacing an older one of that name)."""
        check_name(name)
        loaded = factors if factors is not None else self.loader(Path(path))
        with self.lock:
            if name in self.pins:
                raise ConfigError(f"adapter {name!r} is serving requests right now; remove it first or use a new name.")
            self._drop_slot(name)
            self.unavailable.pop(name, None)
            self.removed.discard(name)
            self.paths[name], self.factors[name] = str(path), loaded
            if persist:
                self._persist()

    def unregister(self, name: str) -> None:
        """Forget ``name`` (served or unavailable); requests already running with it finish with the weights
        they started with. A name whose folder the start-up scan registers is remembered as removed."""
        path = self.path_of(name)
        if path is None:
            raise KeyError(name)
        remember = self._scanned(name, path)
        with self.lock:
            if self.path_of(name) is None:  # removed by another thread meanwhile
                raise KeyError(name)
            self._forget(name)
            if remember:
                self.removed.add(name)
            self._persist()

    def _scanned(self, name: str, path: str) -> bool:
        """Whether the start-up scan would register ``name`` (from a folder of that name in its root)."""
        if self.scan_root is None or path.startswith("<"):
            return False
        folder = self.scan_root / name
        return (folder / CONFIG_NAME).is_file() or Path(path).resolve() == folder.resolve()

    def refuse(self, name: str, reason: str) -> None:
        """Keep ``name`` registered (and saved) but unavailable for ``reason`` while this process runs."""
        with self.lock:
            path = self.path_of(name)
            if path is None:
                raise KeyError(name)
            self._forget(name)
            self.unavailable[name] = Unavailable(path, reason, retry=False)
        log.warning("adapter %r is unavailable: %s", name, reason)

    def _forget(self, name: str) -> None:
        self.paths.pop(name, None)
        self.factors.pop(name, None)
        self.unavailable.pop(name, None)
        if not self.pins[name]:
            self._drop_slot(name)

    def revive(self, name: str) -> bool:
        """Whether ``name`` is served, after looking at an unavailable one's folder again when that is due:
        at most once per ``RETRY_S``, and loaded only when its files changed since a load last failed."""
        with self.lock:
            entry = self.unavailable.get(name)
            if entry is None or not entry.retry or time.monotonic() < entry.next_try:
                return name in self.paths
            entry.next_try = time.monotonic() + RETRY_S
        state = folder_state(Path(entry.path))
        if state is not None and state == entry.seen:
            return False
        factors, why = self._attempt(entry.path, state)
        with self.lock:
            if self.unavailable.get(name) is not entry:  # deleted or registered again meanwhile
                return name in self.paths
            if factors is None:
                entry.reason, entry.seen = why, state
                return False
            del self.unavailable[name]
            self.paths[name], self.factors[name] = entry.path, factors
        log.info("adapter %r is available again (%s)", name, entry.path)
        return True

    def revive_all(self) -> None:
        """:meth:`revive` every unavailable adapter (each still at most once per ``RETRY_S``)."""
        with self.lock:
            names = list(self.unavailable)
        for name in names:
            self.revive(name)

    def reason(self, name: str, root: Path | None = None) -> str | None:
        """Why the registered ``name`` is not served (paths as :func:`public` shows them relative to
        ``root``), or None when it is served or not registered."""
        with self.lock:
            entry = self.unavailable.get(name)
        return None if entry is None else public(entry.reason, entry.path, root)

    def path_of(self, name: str) -> str | None:
        """The dir ``name`` is registered with, served or not."""
        with self.lock:
            entry = self.unavailable.get(name)
            return entry.path if entry is not None else self.paths.get(name)

    def entries(self) -> dict[str, str]:
        """{name: dir} of every registered adapter read from a dir, served or not (what ``registry.json`` holds)."""
        with self.lock:
            saved = {n: p for n, p in self.paths.items() if not p.startswith("<")}  # not the in-memory ones
            return {**saved, **{n: u.path for n, u in self.unavailable.items()}}

    def __contains__(self, name: object) -> bool:
        return name in self.paths

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.paths)

    def acquire(self, name: str) -> int:
        """The slot holding ``name`` (loading it, evicting the least recently used idle slot if needed)."""
        with self.lock:
            slot = self._pin(name)
            self.stats.requests[name] += 1
            return slot

    def preload(self, names: list[str]) -> None:
        """Put registered ``names`` into slots now, without counting a request: resident ones are pinned
        first and all are pinned together, so none evicts another; then released (LRU as usual)."""
        with self.lock:
            if len(names) > self.bank.max_slots:
                raise ConfigError(f"cannot preload {len(names)} adapters into {self.bank.max_slots} slots; name fewer.")
            pinned: list[str] = []
            try:
                for name in sorted(names, key=lambda n: n not in self.slot_of):
                    self._pin(name)
                    pinned.append(name)
            finally:
                for name in pinned:
                    self.release(name)

    def _pin(self, name: str) -> int:
        with self.lock:
            if name in self.slot_of:
                self.slot_of.move_to_end(name)
            else:
                if name not in self.factors:
                    raise KeyError(name)
                slot = self._free_slot()
                self.bank.write(slot, name, self.factors[name])
                self.slot_of[name] = slot
                self.stats.loads += 1
            self.pins[name] += 1
            return self.slot_of[name]

    def release(self, name: str) -> None:
        with self.lock:
            self.pins[name] -= 1
            if self.pins[name] <= 0:
                del self.pins[name]
                if name not in self.paths:  # removed while it was serving
                    self._drop_slot(name)

    def can_acquire(self, names: set[str]) -> bool:
        """Whether slots for all of ``names`` can be had at once without evicting a pinned one."""
        with self.lock:
            missing = sum(1 for n in names if n not in self.slot_of)
            idle = sum(1 for n in self.slot_of if not self.pins[n])
            return missing <= len(self.free) + idle

    def _free_slot(self) -> int:
        if self.free:
            return self.free.pop()
        victim = next((n for n in self.slot_of if not self.pins[n]), None)
        if victim is None:
            raise SlotsFull(f"all {self.bank.max_slots} slots serve running requests.")
        self.stats.evictions += 1
        slot = self.slot_of.pop(victim)
        self.bank.clear(slot)
        return slot

    def _drop_slot(self, name: str) -> None:
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.bank.clear(slot)
            self.free.append(slot)

    def _persist(self) -> None:
        if self.state_file is not None:
            registry_file.write(self.state_file, registry_file.Registry(self.entries(), set(self.removed)))
