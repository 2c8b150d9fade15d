"""Training callbacks, one per file, registered by ``@register_callback``; importing this package
imports every file here, so a new callback edits no other file."""

import importlib
import pkgutil

from lorakit.train.callbacks._api import (
    CALLBACKS,
    Callback,
    CallbackList,
    CallbackSpec,
    TrainState,
    build_callbacks,
    callback_names,
    check_callbacks,
    register_callback,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "CALLBACKS",
    "Callback",
    "CallbackList",
    "CallbackSpec",
    "TrainState",
    "build_callbacks",
    "callback_names",
    "check_callbacks",
    "register_callback",
]
