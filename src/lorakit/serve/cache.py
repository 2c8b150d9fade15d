"""Adapters by name: a persisted registry, RAM-resident factors, and slots lent out with LRU eviction.

``register`` reads an adapter once into RAM as plain factors (any method with ``to_lora``, via the
loader the engine gives); ``acquire`` puts it into a slot of the :class:`SlotBank` when a request
needs it, evicting the least recently used slot nobody is using; ``release`` ends that use. The
registry (name → path) is saved atomically as ``registry.json`` in ``state_dir``, so a restarted
server knows its adapters. All methods are thread-safe.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import ConfigError
from lorakit.io.atomic import atomic_write_text
from lorakit.serve.slots import Factors, SlotBank

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SlotsFull(RuntimeError):
    """Every slot is in use by running requests; the caller waits for one to finish."""


def check_name(name: str) -> str:
    """An adapter name is a plain file-name-like token: it can never name a path outside a folder."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise ConfigError(
            f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' or '-' (≤128 characters, "
            "starting with a letter or digit, no '..')."
        )
    return name


@dataclass
class Stats:
    loads: int = 0  # adapters copied into a slot
    evictions: int = 0  # slots taken from a resident adapter to serve another
    requests: collections.Counter[str] = field(default_factory=collections.Counter)


class AdapterCache:
    """Registered adapters (resident in RAM) and their slots in ``bank``."""

    def __init__(self, bank: SlotBank, loader: Callable[[Path], Factors], state_dir: str | Path | None = None):
        self.bank, self.loader = bank, loader
        self.state_file = Path(state_dir) / "registry.json" if state_dir is not None else None
        self.paths: dict[str, str] = {}
        self.factors: dict[str, Factors] = {}
        self.slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order: oldest first
        self.pins: collections.Counter[str] = collections.Counter()
        self.free = list(range(bank.max_slots - 1, -1, -1))
        self.stats = Stats()
        self.lock = threading.RLock()

    def restore(self) -> list[str]:
        """Re-register what ``registry.json`` lists; returns the names that could not be loaded."""
        if self.state_file is None or not self.state_file.exists():
            return []
        failed = []
        for name, path in json.loads(self.state_file.read_text()).items():
            try:
                self.register(name, path, persist=False)
            except Exception:  # noqa: BLE001 - a vanished adapter must not stop the server from starting
                failed.append(name)
        self._persist()
        return failed

    def register(self, name: str, path: str | Path, *, persist: bool = True, factors: Factors | None = None) -> None:
        """Read the adapter at ``path`` into RAM under ``name`` (replacing an older one of that name)."""
        check_name(name)
        loaded = factors if factors is not None else self.loader(Path(path))
        with self.lock:
            if name in self.pins:
                raise ConfigError(f"adapter {name!r} is serving requests right now; remove it first or use a new name.")
            self._drop_slot(name)
            self.paths[name], self.factors[name] = str(path), loaded
            if persist:
                self._persist()

    def unregister(self, name: str) -> None:
        """Forget ``name``; requests already running with it finish with the weights they started with."""
        with self.lock:
            if name not in self.paths:
                raise KeyError(name)
            del self.paths[name], self.factors[name]
            if not self.pins[name]:
                self._drop_slot(name)
            self._persist()

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
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            on_disk = {n: p for n, p in self.paths.items() if not p.startswith("<")}  # not in-memory ones
            atomic_write_text(self.state_file, json.dumps(on_disk, indent=1, sort_keys=True))
