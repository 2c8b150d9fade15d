"""What the training registries (``optimizers/``, ``callbacks/``) share: adding an entry once, and
looking a name up with an error that lists the registered names and the closest ones."""

from __future__ import annotations

import difflib
from typing import TypeVar

from lorakit.errors import ConfigError

Spec = TypeVar("Spec")


def add_entry(registry: dict[str, Spec], kind: str, name: str, spec: Spec, same: bool) -> None:
    """Put ``spec`` under ``name``; a second, different entry (``same`` False) under a taken name is an error."""
    if name in registry and not same:
        raise ValueError(f"{kind} {name!r} is registered twice")
    registry[name] = spec


def unknown_entry(registry: dict[str, Spec], kind: str, name: object) -> ConfigError:
    """The error for a ``kind`` name that is not in ``registry``: the closest names, then all of them."""
    close = difflib.get_close_matches(str(name), registry, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}.{hint} Registered {kind}s: {', '.join(sorted(registry))}.")


def get_entry(registry: dict[str, Spec], kind: str, name: str) -> Spec:
    """``registry[name]``, or :func:`unknown_entry`'s error."""
    if name not in registry:
        raise unknown_entry(registry, kind, name)
    return registry[name]
