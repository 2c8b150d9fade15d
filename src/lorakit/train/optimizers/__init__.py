"""Optimizers, one per file, registered by ``@register_optimizer``; importing this package imports
every file here, so a new optimizer edits no other file."""

from lorakit.registry import import_entries
from lorakit.train.optimizers._api import (
    OPTIMIZERS,
    OptimizerSpec,
    active_adapters,
    build_optimizer,
    optimizer_names,
    register_optimizer,
)

import_entries(__name__, __path__)

__all__ = ["OPTIMIZERS", "OptimizerSpec", "active_adapters", "build_optimizer", "optimizer_names", "register_optimizer"]
