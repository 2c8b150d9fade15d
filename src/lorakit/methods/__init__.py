"""Adapter methods, one per file; importing this package registers every one of them."""

import importlib
import pkgutil

from lorakit.methods._api import REGISTRY, LoraFactors, MethodSpec, get_spec, method_config, register

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["REGISTRY", "LoraFactors", "MethodSpec", "get_spec", "method_config", "register"]
