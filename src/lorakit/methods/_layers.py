"""The base layer kinds adapters wrap, seen through one lens: a linear map from ``in`` to ``out``.

``nn.Linear`` stores W as (out, in); transformers' GPT-2 ``Conv1D`` stores it as (in, out);
``nn.Embedding`` stores (num_embeddings, dim) and is linear in the one-hot token, so it is the
map in=num_embeddings → out=dim. Methods work in (out, in) orientation and call these helpers to
apply a projection to the input and to return a delta in the base's own layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import TargetError

SUPPORTED = (nn.Linear, Conv1D, nn.Embedding)


def layer_kind(base: nn.Module, name: str = "") -> str:
    """'linear', 'conv1d' or 'embedding'; any other type is a TargetError naming the module."""
    if isinstance(base, nn.Linear):
        return "linear"
    if isinstance(base, Conv1D):
        return "conv1d"
    if isinstance(base, nn.Embedding):
        return "embedding"
    where = f"module {name!r}" if name else "a target module"
    raise TargetError(
        f"{where} is a {type(base).__module__}.{type(base).__name__}, which lorakit adapters cannot wrap; "
        "supported types are torch.nn.Linear, transformers Conv1D and torch.nn.Embedding. "
        "Narrow `targets` or add the module to `exclude`."
    )


def dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of the base layer seen as a linear map."""
    kind = layer_kind(base)
    b: Any = base
    if kind == "linear":
        return int(b.in_features), int(b.out_features)
    if kind == "conv1d":
        return int(b.weight.shape[0]), int(b.weight.shape[1])  # Conv1D weight: (in, out)
    return int(b.num_embeddings), int(b.embedding_dim)


def weight_out_in(base: nn.Module) -> torch.Tensor:
    """The base weight as an (out, in) matrix (a view, no copy)."""
    weight: torch.Tensor = base.weight  # type: ignore[assignment]
    return weight if layer_kind(base) == "linear" else weight.T


def to_base_layout(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """Turn an (out, in) delta into the base weight's own layout."""
    return delta if layer_kind(base) == "linear" else delta.T


def project_in(base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """x ↦ A·x for A (r, in): a matmul for linear maps, a row lookup of Aᵀ for embeddings."""
    if isinstance(base, nn.Embedding):
        h = F.embedding(  # (..., r)
            x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) scale the adapter path too
        return h if scale is None else h * scale
    return F.linear(x.to(A.dtype), A)  # (..., r)


def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W·x without the bias (DoRA rescales only the weight's contribution)."""
    if isinstance(base, nn.Embedding):
        return base(x)
    return F.linear(x, weight_out_in(base))


def base_bias(base: nn.Module) -> torch.Tensor | None:
    return getattr(base, "bias", None) if not isinstance(base, nn.Embedding) else None
