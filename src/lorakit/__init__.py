"""lorakit: the low-rank adapter lifecycle system.

import lorakit as lk
model, tok = lk.load_base("smollm2-135m")
model = lk.attach(model, lk.method_config("lora", r=8, alpha=16), targets="all-linear")
lk.save_adapter(model, "out/adapter")
"""

__version__ = "0.1.0"

from lorakit import methods  # noqa: E402  (callable package: lk.methods() lists method names)
from lorakit.analysis import analyze  # noqa: E402
from lorakit.compose import merge_adapters  # noqa: E402
from lorakit.errors import AdapterFormatError, BaseModelError, ConfigError, LorakitError, TargetError  # noqa: E402
from lorakit.inject import (  # noqa: E402
    active_adapter,
    adapter_names,
    attach,
    delete_adapter,
    disabled,
    merge,
    set_active,
)
from lorakit.io import load_adapter, save_adapter  # noqa: E402
from lorakit.methods import REGISTRY, method_config  # noqa: E402
from lorakit.models import load_base  # noqa: E402

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
    "disabled",
    "load_adapter",
    "load_base",
    "merge",
    "merge_adapters",
    "method_config",
    "methods",
    "save_adapter",
    "set_active",
]
