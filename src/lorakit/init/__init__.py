"""Initialisations (PiSSA, LoRA-GA, EVA, ...), one per file; importing this package registers every one.

An init registers with the same ``@register`` as a method (family "F3"). Data-driven ones declare
``calibration=True`` and read their batches in the adapter class's ``initialize`` hook (helpers in
``_calib.py``); ones that rewrite the base weight expose ``base_shift()`` so ``lk.save_adapter``
writes a plain LoRA relative to the original base. ``lorakit.methods`` imports this package last.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
