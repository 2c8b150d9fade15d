"""The running batch's key/value cache: left-padded rows that join, leave and get reordered between steps.

Every row of the batch shares one cache length L; row i's real tokens are the last ``L − pad[i]``
positions (left padding), masked out by the attention mask. A joining group (prefilled on its
own) is left-padded to the longer length and concatenated on the batch axis; leaving rows are
dropped with an index select, and padding columns no row needs any more are trimmed.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for layer in cache.layers:
        k: Any = getattr(layer, "keys", None)
        v: Any = getattr(layer, "values", None)
        out.append((k, v))  # each (B, H, L, D)
    return out


def select(cache: DynamicCache, rows: torch.Tensor, trim: int = 0) -> DynamicCache:
    """The cache of ``rows`` (in that order), without its first ``trim`` (all-padding) positions."""
    return DynamicCache([(k[rows, :, trim:], v[rows, :, trim:]) for k, v in _layers(cache)])


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3])
    return torch.cat([pad, t], dim=2)


def join(a: DynamicCache, b: DynamicCache) -> DynamicCache:
    """Rows of ``a`` then rows of ``b``, the shorter left-padded to the longer's length."""
    la, lb = a.get_seq_length(), b.get_seq_length()
    length = max(la, lb)
    out = []
    for (ka, va), (kb, vb) in zip(_layers(a), _layers(b), strict=True):
        k = torch.cat([_left_pad(ka, length - la), _left_pad(kb, length - lb)], dim=0)
        v = torch.cat([_left_pad(va, length - la), _left_pad(vb, length - lb)], dim=0)
        out.append((k, v))
    return DynamicCache(out)
