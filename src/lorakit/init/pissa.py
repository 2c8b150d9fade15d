"""PiSSA: Principal Singular Values and Singular Vectors Adaptation of LLMs — https://arxiv.org/abs/2404.02948
Update rule: W = U S Vᵀ; s·B·A = U_r S_r V_rᵀ (B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ), base ← W − s·B·A.

The adapter trains the principal part of W while the frozen residual W_res = W − U_r S_r V_rᵀ keeps
the rest, so the model's outputs are unchanged at init. ``niter`` = N uses the randomized SVD
(``torch.svd_lowrank``, PEFT's ``init_lora_weights="pissa_niter_N"``) instead of the exact one.
Saved adapters are plain LoRA relative to the original W, of rank 2r (ΔW − U_r S_r V_rᵀ); see
``io/adapter.py``. Deleting or disabling the adapter leaves the residual base, as in PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.methods._api import LoraFactors, register, require
from lorakit.methods.lora import Lora, LoraConfig


@dataclass(frozen=True, kw_only=True)
class PissaConfig(LoraConfig):
    niter: int | None = None
    """None: exact SVD of W; N: randomized SVD with N subspace iterations (PEFT's 'pissa_niter_N')."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.niter is None or (isinstance(self.niter, int) and self.niter >= 0),
            f"pissa: niter must be None (exact SVD) or an integer >= 0, got {self.niter!r}.",
        )
        require(self.init == "default", f"pissa sets A and B from the SVD of W; leave init unset (got {self.init!r}).")
        require(self.train_only is None and not self.lora_bias, "pissa does not combine with train_only or lora_bias.")


def principal(W: torch.Tensor, r: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r (out, r), S_r (r,), Vh_r (r, in)) of the top-r SVD of W, exact or randomized (PEFT's convention)."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(W, q=r, niter=niter)  # U (out, r), S (r,), V (in, r)
    return U, S, V.T


@register(
    "pissa",
    config=PissaConfig,
    paper="PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models",
    url="https://arxiv.org/abs/2404.02948",
    family="F3",
    params="r*(d_in+d_out)",
    layers=("linear", "conv1d"),
)
class Pissa(Lora):
    """x ↦ W_res·x + s·B·A·x with W_res = W − s·B₀·A₀ and s·B₀·A₀ = U_r S_r V_rᵀ at init."""

    peft_type = "LORA"
    shift_A: torch.Tensor
    shift_B: torch.Tensor

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraConfig) -> Pissa:
        assert isinstance(cfg, PissaConfig)  # the registry pairs Pissa with PissaConfig
        in_features, out_features = L.dims(base)
        require(
            cfg.r <= min(in_features, out_features),
            f"pissa: r={cfg.r} exceeds min(d_in, d_out) = {min(in_features, out_features)} of a "
            f"{in_features}→{out_features} layer; lower r or leave that module out.",
        )
        W = L.weight_out_in(base).detach().float()  # (out, in)
        U, S, Vh = principal(W, cfg.r, cfg.niter)  # before any other draw, so a seed fixes niter's sketch
        root = (S / cfg.scale).sqrt()  # (r,)
        A0, B0 = root[:, None] * Vh, U * root  # (r, in), (out, r): s·B0·A0 = U_r S_r V_rᵀ
        adapter = cls(cfg, in_features, out_features, L.layer_kind(base), base.weight)  # type: ignore[arg-type]
        with torch.no_grad():
            adapter.A.copy_(A0)
            adapter.B.copy_(B0)
        adapter.register_buffer("shift_A", A0, persistent=False)  # (r, in) float32: what leaves the base
        adapter.register_buffer("shift_B", B0, persistent=False)  # (out, r)
        return adapter

    @classmethod
    def initialize(cls, model: nn.Module, adapters: dict[str, nn.Module], cfg: PissaConfig, batches: Any) -> None:
        """W ← W − s·B₀·A₀ on every wrapped base layer (in float32, stored in W's dtype)."""
        for name, adapter in adapters.items():
            base: Any = model.get_submodule(name).base_layer
            assert isinstance(adapter, Pissa)
            subtract_shift(base, adapter.base_shift())

    def base_shift(self) -> LoraFactors:
        """The low-rank amount subtracted from the base weight at init: scale·shift_B @ shift_A, (out, in)."""
        return LoraFactors(self.shift_A, self.shift_B, self.scale)

    @staticmethod
    def peft_fields(cfg: LoraConfig) -> dict[str, Any]:
        assert isinstance(cfg, PissaConfig)
        init = "pissa" if cfg.niter is None else f"pissa_niter_{cfg.niter}"
        return Lora.peft_fields(cfg) | {"init_lora_weights": init}


def subtract_shift(base: Any, shift: LoraFactors) -> None:
    """base.weight ← W − scale·B @ A, computed in float32 and stored in the weight's own dtype and layout."""
    weight = base.weight
    with torch.no_grad():
        delta = shift.scale * (shift.B.float() @ shift.A.float())  # (out, in)
        weight.copy_((weight.float() - L.to_base_layout(base, delta)).to(weight.dtype))
