"""SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation — https://arxiv.org/abs/2501.01765
Update rule: h = W_res·x + s·C·B·A·x, C = I − U_C U_Cᵀ (fixed), W_res = W − s·C·B₀·A₀; only A, B train.

The safety module C is computed from safety data (the calibration batches: harmful prompts with safe
responses): U_C (out, safety_rank) are the top left singular vectors of the layer's safety features
W·X_safe, X_safe (in, n) the inputs the layer sees on those batches (response tokens only when the batches
carry labels, as the authors' code). Since U_Cᵀ·C = 0, the adapter never moves the outputs along the safety
features: U_Cᵀ·(W_res + s·C·B·A − W) = s·U_Cᵀ·C·(B·A − B₀·A₀) = 0 through training. A₀, B₀ are PiSSA's
(s·B₀·A₀ = U_r S_r V_rᵀ of W); the paper further projects B₀ onto the task-feature subspace (its eq. 12),
which needs a second, task data set that ``attach`` does not take: that projection is left out (the
paper's "w/o task init" ablation). Saved adapters are plain LoRA relative to the original W, of rank 2r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._calib import as_batches, base_layer, input_activations
from lorakit.lowrank import principal
from lorakit.methods._api import AdapterModule, LoraFactors, register, require
from lorakit.methods.lowrank.lora import Lora, LoraConfig


@dataclass(frozen=True, kw_only=True)
class SaloraConfig(LoraConfig):
    safety_rank: int = 16
    """r_s: dimensions of the safety-feature subspace C removes (the authors use 32 on Llama-2-7B's 4096-wide
    layers; 16 fits layers as narrow as 32). Must be below every targeted layer's d_out."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            isinstance(self.safety_rank, int) and self.safety_rank > 0,
            f"salora: safety_rank must be a positive integer, got {self.safety_rank!r}.",
        )
        require(self.init == "default", f"salora sets A and B from the SVD of W; leave init unset (got {self.init!r}).")
        require(self.train_only is None and not self.lora_bias, "salora does not combine with train_only or lora_bias.")


def safety_basis(W: torch.Tensor, X: torch.Tensor, k: int) -> torch.Tensor:
    """U_C (out, k): top-k left singular vectors of W·Xᵀ for W (out, in), X (n, in) rows of safety features.

    Computed as the top eigenvectors of (W·Xᵀ)(W·Xᵀ)ᵀ = W·(XᵀX)·Wᵀ, an out×out matrix, in float64.
    """
    Wd = W.double()
    gram = Wd @ (X.double().T @ X.double()) @ Wd.T  # (out, out)
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[:, -k:].flip(1)  # (out, k)


@register(
    "salora",
    config=SaloraConfig,
    paper="SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation",
    url="https://arxiv.org/abs/2501.01765",
    family="F3",
    params="r*(d_in+d_out)",
    layers=("linear", "conv1d"),
    calibration=True,
)
class Salora(Lora):
    """x ↦ W_res·x + s·C·B·A·x, C·B = B − U_C (U_Cᵀ B)."""

    peft_type = None  # type: ignore[assignment]  # saved as plain LoRA via base_shift; PEFT has no SaLoRA
    Uc: torch.Tensor
    shift_A: torch.Tensor
    shift_B: torch.Tensor

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraConfig) -> Salora:
        """Shapes only: U_C, A₀, B₀ and the residual come from the data, in :meth:`initialize`."""
        assert isinstance(cfg, SaloraConfig)
        d_in, d_out = L.dims(base)
        require(
            cfg.safety_rank < d_out and cfg.r <= min(d_in, d_out),
            f"salora: a {d_in}→{d_out} layer needs safety_rank < d_out (got {cfg.safety_rank}) and r <= "
            f"min(d_in, d_out) (got {cfg.r}); lower them or leave that module out.",
        )
        adapter: Any = super().from_base(base, cfg)
        like = {"dtype": adapter.A.dtype, "device": adapter.A.device}
        adapter.register_buffer("Uc", torch.zeros(d_out, cfg.safety_rank, **like), persistent=False)
        adapter.register_buffer("shift_A", torch.zeros(cfg.r, d_in, **like), persistent=False)  # A₀ (r, in)
        adapter.register_buffer("shift_B", torch.zeros(d_out, cfg.r, **like), persistent=False)  # C·B₀ (out, r)
        return adapter

    @classmethod
    def initialize(cls, model: nn.Module, adapters: dict[str, AdapterModule], cfg: SaloraConfig, batches: Any) -> None:
        """U_C from the safety features of every layer (one pass over the base), then A₀, B₀ and W ← W_res."""
        batches = as_batches(batches, need_labels=False, min_rows=cfg.safety_rank, where="salora")
        names = list(adapters)
        feats = input_activations(model, names, batches, label_mask=True)  # {name: (n, d_in)}, before any shift
        for name in names:
            if feats[name].shape[0] < cfg.safety_rank:
                raise ConfigError(
                    f"salora: {name} saw {feats[name].shape[0]} safety feature rows (response tokens) but "
                    f"safety_rank={cfg.safety_rank} needs at least that many; pass more safety batches."
                )
        for name in names:
            adapter, base = adapters[name], base_layer(model, name)
            assert isinstance(adapter, Salora)
            adapter.set_from(L.weight_out_in(base).detach().float(), feats[name])
            L.subtract(base, adapter.base_shift())

    def set_from(self, W: torch.Tensor, X: torch.Tensor) -> None:
        """U_C = safety_basis(W, X); PiSSA's A₀, B₀ (s·B₀·A₀ = U_r S_r V_rᵀ); the shift s·C·B₀·A₀."""
        cfg = self.config
        assert isinstance(cfg, SaloraConfig)
        Uc = safety_basis(W, X, cfg.safety_rank).float()  # (out, r_s)
        U, S, Vh = principal(W, cfg.r, None)  # (out, r), (r,), (r, in)
        root = (S / cfg.scale).sqrt()  # (r,)
        A0, B0 = root[:, None] * Vh, U * root  # (r, in), (out, r)
        with torch.no_grad():
            for buffer, value in ((self.Uc, Uc), (self.A, A0), (self.B, B0), (self.shift_A, A0)):
                buffer.copy_(value)
            self.shift_B.copy_(self.out_B())  # C·B₀

    def base_shift(self) -> LoraFactors:
        """The amount subtracted from the base at init: s·C·B₀·A₀, (out, in), rank r."""
        return LoraFactors(self.shift_A, self.shift_B, self.scale)

    def out_B(self) -> torch.Tensor:
        """C·B = B − U_C (U_Cᵀ B), (out, r)."""
        return self.B - self.Uc @ (self.Uc.T @ self.B)

    @staticmethod
    def peft_fields(cfg: LoraConfig) -> dict[str, Any]:
        return Lora.peft_fields(cfg)
