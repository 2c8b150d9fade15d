"""Initialisations as options of A/B methods (``lk.method_config("dora", r=8, init="pissa")``), one per file.

Importing this package registers every init (``@register_init`` in ``_api.py``); ``_calib.py`` holds the
calibration helpers of the inits that read data. Inits that change the parametrisation (LoRA-SB's r×r
core, LoLDU, DoTA, Comp-LoRA and SaLoRA's projections) are methods, in ``lorakit/methods``.
"""

from lorakit.init._api import BUILTIN, INITS, InitContext, InitFactors, InitSpec, InitTarget, get_init, register_init
from lorakit.registry import import_entries

import_entries(__name__, __path__)

__all__ = ["BUILTIN", "INITS", "InitContext", "InitFactors", "InitSpec", "InitTarget", "get_init", "register_init"]
