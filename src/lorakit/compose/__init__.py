"""Composing adapters: merge methods, one per file, registered by ``@merge_method`` (importing this
package imports every file here, so a new method edits no other file); ``merge.py`` drives them,
``into_base.py`` folds one adapter into its base, ``compress.py`` fits many into one collection.

import lorakit as lk
lk.merge_adapters(["a", "b"], method="ties", weights=[1, 0.5], out="merged", density=0.5, rank=16)
"""

from lorakit.compose._api import MERGE_METHODS, MergeSpec, get_merge_method, merge_method
from lorakit.registry import import_entries

import_entries(__name__, __path__)

from lorakit.compose.into_base import merge_into_base  # noqa: E402
from lorakit.compose.merge import merge_adapters, merge_module  # noqa: E402

__all__ = [
    "MERGE_METHODS",
    "MergeSpec",
    "get_merge_method",
    "merge_adapters",
    "merge_into_base",
    "merge_method",
    "merge_module",
]
