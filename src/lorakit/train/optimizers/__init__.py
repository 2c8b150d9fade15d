"""Optimizers, one per file, registered by ``@register_optimizer``; importing this package imports
every file here, so a new optimizer edits no other file."""

import importlib
import pkgutil

from lorakit.train.optimizers._api import (
    OPTIMIZERS,
    OptimizerSpec,
    active_adapters,
    build_optimizer,
    optimizer_names,
    register_optimizer,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["OPTIMIZERS", "OptimizerSpec", "active_adapters", "build_optimizer", "optimizer_names", "register_optimizer"]
