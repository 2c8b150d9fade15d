"""torch.nn.Embedding: linear in the one-hot token, the map in=num_embeddings → out=dim; weight (in, out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers._api import register_kind


@register_kind
class Embedding:
    name = "embedding"
    family = "embedding"
    types = (nn.Embedding,)
    quantized = False

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        return int(base.num_embeddings), int(base.embedding_dim)  # type: ignore[arg-type]

    @staticmethod
    def weight_out_in(base: nn.Module) -> torch.Tensor:
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return weight.T  # (dim, num_embeddings) view

    @staticmethod
    def to_base_layout(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        return delta.T

    @staticmethod
    def project_in(base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """A row lookup of Aᵀ; scaled embeddings (Gemma's embed_scale) scale the adapter path too."""
        b: nn.Embedding = base  # type: ignore[assignment]
        h = F.embedding(x, A.T, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)  # (..., r)
        scale = getattr(base, "embed_scale", None)
        return h if scale is None else h * scale

    @staticmethod
    def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base(x)

    @staticmethod
    def base_bias(base: nn.Module) -> torch.Tensor | None:
        return None

    @staticmethod
    def forward_with(base: nn.Module, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        e: nn.Embedding = base  # type: ignore[assignment]
        return F.embedding(x, W.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
