"""Placement methods, one per file, registered by ``@register_placement``: each picks ``targets`` for
``lk.attach`` from the base model and a few training batches (``lorakit train --targets auto:NAME``).
Importing this package imports every file here, so a new placement edits no other file."""

from lorakit.registry import import_entries
from lorakit.train.placement._api import (
    PLACEMENTS,
    Placement,
    PlacementSpec,
    build_placement,
    check_placement,
    is_placement,
    place,
    placement_names,
    register_placement,
    split_placement,
)

import_entries(__name__, __path__)

__all__ = [
    "PLACEMENTS",
    "Placement",
    "PlacementSpec",
    "build_placement",
    "check_placement",
    "is_placement",
    "place",
    "placement_names",
    "register_placement",
    "split_placement",
]
