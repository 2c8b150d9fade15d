"""Initialisations as options of A/B methods (``lk.method_config("dora", r=8, init="pissa")``), one per file.

Importing this package registers every init (``@register_init`` in ``_api.py``); ``_calib.py`` holds the
calibration helpers of the inits that read data. Inits that change the parametrisation (LoRA-SB's r×r
core, LoLDU, DoTA, Comp-LoRA and SaLoRA's projections) are methods, in ``lorakit/methods``.
"""

import importlib
import pkgutil

from lorakit.init._api import BUILTIN, INITS, InitContext, InitFactors, InitSpec, InitTarget, get_init, register_init

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["BUILTIN", "INITS", "InitContext", "InitFactors", "InitSpec", "InitTarget", "get_init", "register_init"]
