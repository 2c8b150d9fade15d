"""Adapter methods, one per file; importing this package registers every one of them."""

import importlib
import pkgutil
import sys
import types

from lorakit.methods._api import REGISTRY, LoraFactors, MethodSpec, get_spec, method_config, register

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


class _MethodsPackage(types.ModuleType):
    """This package is also callable: ``lk.methods()`` lists the registered method names, while
    ``import lorakit.methods.lora`` keeps working (a plain function would shadow the package)."""

    def __call__(self) -> list[str]:
        return sorted(REGISTRY)


sys.modules[__name__].__class__ = _MethodsPackage

__all__ = ["REGISTRY", "LoraFactors", "MethodSpec", "get_spec", "method_config", "register"]
