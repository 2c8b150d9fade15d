"""What every registry shares (methods, inits, base-layer kinds, merges, optimizers, callbacks): adding an
entry once, looking a name up with an error that lists the registered names and the closest ones, and
checking an entry's options by name. Core: it imports nothing from lorakit but the errors."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from lorakit.errors import ConfigError

Spec = TypeVar("Spec")


def add_entry(registry: dict[str, Spec], kind: str, name: str, spec: Spec, same: bool) -> None:
    """Put ``spec`` under ``name``; a second, different entry (``same`` False) under a taken name is an error."""
    if name in registry and not same:
        raise ValueError(f"{kind} {name!r} is registered twice")
    registry[name] = spec


def unknown_entry(
    registry: Mapping[str, object], kind: str, name: object, known: Sequence[str] | None = None
) -> ConfigError:
    """The error for a ``kind`` name that is not in ``registry``: the closest names, then all of them
    (``known``: the names to offer, when more than the registry's, e.g. built-in inits)."""
    names = list(known) if known is not None else sorted(registry)
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}.{hint} Registered {kind}s: {', '.join(names)}.")


def check_options(valid: Iterable[str], given: Iterable[str], what: str, noun: str = "options") -> None:
    """A ConfigError naming the ``given`` option names that are not ``valid`` ones, and listing the valid ones."""
    fields = sorted(valid)
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ConfigError(f"{what} has no option(s) {', '.join(unknown)}; valid {noun}: {', '.join(fields) or 'none'}.")


def get_entry(registry: dict[str, Spec], kind: str, name: str) -> Spec:
    """``registry[name]``, or :func:`unknown_entry`'s error."""
    if name not in registry:
        raise unknown_entry(registry, kind, name)
    return registry[name]


def import_entries(package: str, path: Iterable[str], *, recursive: bool = False) -> None:
    """Import every module of the registry folder ``package`` (its ``__path__``), which registers each entry;
    a name starting with ``_`` is a helper, not an entry. ``recursive``: subpackages too (methods/<family>/)."""
    found = pkgutil.walk_packages(path, f"{package}.") if recursive else pkgutil.iter_modules(path, f"{package}.")
    for info in found:
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(info.name)
