"""LoRA+: Efficient Low Rank Adaptation of Large Models — https://arxiv.org/abs/2402.12354
Update: AdamW with lr_B = λ·lr_A (λ = ``loraplus_ratio``); 1-D adapter parameters go with B, embedding adapters
learn at a small fixed rate, as PEFT's ``create_loraplus_optimizer`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.train.optimizers._api import active_adapters, register_optimizer
from lorakit.train.optimizers.adamw import adamw

if TYPE_CHECKING:
    from lorakit.train.loop import TrainConfig


def loraplus_groups(model: nn.Module, lr: float, ratio: float, lr_embedding: float = 1e-6) -> list[dict[str, Any]]:
    """Parameter groups of LoRA+: A at lr, B and 1-D parameters at lr·ratio, embeddings at lr_embedding."""
    groups: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "embedding": []}
    for adapter, base in active_adapters(model):
        for name, p in adapter.named_parameters():
            if not p.requires_grad:
                continue
            if isinstance(base, nn.Embedding):
                groups["embedding"].append(p)
            elif name == "B" or p.ndim == 1:
                groups["B"].append(p)
            else:
                groups["A"].append(p)
    return [
        {"params": groups["A"], "lr": lr},
        {"params": groups["embedding"], "lr": lr_embedding},
        {"params": groups["B"], "lr": lr * ratio},
    ]


@register_optimizer(
    "loraplus",
    help="LoRA+: AdamW with B at lr·loraplus_ratio, A at lr.",
    paper="LoRA+: Efficient Low Rank Adaptation of Large Models",
    url="https://arxiv.org/abs/2402.12354",
)
def build(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return adamw(loraplus_groups(model, cfg.lr, cfg.loraplus_ratio), lr=cfg.lr, weight_decay=cfg.weight_decay)
