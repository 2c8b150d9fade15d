"""lorakit: the low-rank adapter lifecycle system.

import lorakit as lk
model, tok = lk.load_base("smollm2-135m")
model = lk.attach(model, lk.method_config("lora", r=8, alpha=16), targets="all-linear")
lk.save_adapter(model, "out/adapter")

The names below load on first use (PEP 562): ``import lorakit`` costs only the errors module, so
a command such as ``lorakit extract`` imports just what it runs (no method files, no transformers).
``lk.attach``, ``from lorakit import attach`` and ``lk.methods()`` work as if imported eagerly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lorakit.errors import AdapterFormatError, BaseModelError, ConfigError, LorakitError, TargetError

__version__ = "0.1.0"

# public name -> module defining it ("methods" is the callable package itself: lk.methods() lists names)
_LAZY = {
    "methods": "lorakit.methods",
    "REGISTRY": "lorakit.methods",
    "method_config": "lorakit.methods",
    "analyze": "lorakit.analysis",
    "merge_adapters": "lorakit.compose",
    "active_adapter": "lorakit.inject",
    "adapter_names": "lorakit.inject",
    "attach": "lorakit.inject",
    "delete_adapter": "lorakit.inject",
    "disabled": "lorakit.inject",
    "merge": "lorakit.inject",
    "set_active": "lorakit.inject",
    "load_adapter": "lorakit.io",
    "save_adapter": "lorakit.io",
    "load_base": "lorakit.models",
    "quantize": "lorakit.quant",
    "dequantize": "lorakit.quant",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from lorakit import methods
    from lorakit.analysis import analyze
    from lorakit.compose import merge_adapters
    from lorakit.inject import active_adapter, adapter_names, attach, delete_adapter, disabled, merge, set_active
    from lorakit.io import load_adapter, save_adapter
    from lorakit.methods import REGISTRY, method_config
    from lorakit.models import load_base
    from lorakit.quant import dequantize, quantize


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first access, then keep the value here."""
    if name not in _LAZY:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name == "methods" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "REGISTRY",
    "AdapterFormatError",
    "BaseModelError",
    "ConfigError",
    "LorakitError",
    "TargetError",
    "active_adapter",
    "adapter_names",
    "analyze",
    "attach",
    "delete_adapter",
    "dequantize",
    "disabled",
    "load_adapter",
    "load_base",
    "merge",
    "merge_adapters",
    "method_config",
    "methods",
    "quantize",
    "save_adapter",
    "set_active",
]
