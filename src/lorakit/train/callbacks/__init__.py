"""Training callbacks, one per file, registered by ``@register_callback``; importing this package
imports every file here, so a new callback edits no other file."""

from lorakit.registry import import_entries
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

import_entries(__name__, __path__)

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
    "split_spec",
]
