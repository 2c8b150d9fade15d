"""Adapter methods, one per file, grouped by family in subpackages (the tree shows what kinds exist):

- ``lowrank/``: ΔW = s·B·A and its rescalings, decompositions and re-parametrisations (LoRA, DoRA, ...);
- ``shared/``: updates built from tensors shared across layers (VeRA, RandLoRA, VB-LoRA, LoTR);
- ``structured/``: structured ΔW that is not a plain low-rank product (Fourier, circulant, Kronecker, ...);
- ``sparse/``: sparse ΔW on a fixed mask of weight entries (SHiRA).

Importing this package imports every file below it (``_``-prefixed ones are helpers), which registers
every method; ``_api.py`` declares the contract.
"""

import sys
import types

from lorakit.methods._api import REGISTRY, LoraFactors, MethodSpec, get_spec, method_config, register
from lorakit.registry import import_entries

import_entries(__name__, __path__, recursive=True)


class _MethodsPackage(types.ModuleType):
    """This package is also callable: ``lk.methods()`` lists the registered method names, while
    ``import lorakit.methods.lowrank.lora`` keeps working (a plain function would shadow the package)."""

    def __call__(self) -> list[str]:
        return sorted(REGISTRY)


sys.modules[__name__].__class__ = _MethodsPackage

__all__ = ["REGISTRY", "LoraFactors", "MethodSpec", "get_spec", "method_config", "register"]
