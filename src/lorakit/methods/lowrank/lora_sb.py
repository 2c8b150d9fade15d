"""LoRA-SB: Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning — https://arxiv.org/abs/2411.19557
Update rule: h = W₀x + s·B·R·A·x with frozen B (out, r), A (r, in) and only R (r×r) trained; B·R₀·A = [ΔW₁]_r/s.

ΔW₁ is the first full fine-tuning update estimated on the calibration batches: −η·G ('sgd', the paper's derivation)
or −η·sign(G) ('adam', Adam's first step, which the authors' code uses); G = ∇_W L(W₀). With U S Vᵀ = SVD(ΔW₁):
B = U_r, A = V_rᵀ, R₀ = S_r/s, so s·B·R₀·A is the best rank-r approximation of ΔW₁ (Eckart–Young). As the authors,
s = 1 (alpha = r) and the base weight is NOT shifted: the model starts at the approximated first step. B and A are
data-derived, so they are saved with the adapter (PEFT has no LoRA-SB: lorakit's own keys, config in its block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._calib import as_batches, full_gradients
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require

FIRST_STEPS = ("sgd", "adam")


@dataclass(frozen=True, kw_only=True)
class LoraSBConfig:
    r: int = 8
    """Rank of the frozen B, A; the trained core R is r×r."""
    alpha: float | None = None
    """Scaling numerator: the update is multiplied by alpha/r; None means alpha = r (s = 1, the authors' setting)."""
    lr: float = 2e-4
    """η of the simulated first step ΔW₁ (the training learning rate at step 1)."""
    first_step: str = "sgd"
    """'sgd': ΔW₁ = −η·G; 'adam': ΔW₁ = −η·sign(G) (Adam's first step, as the authors' code)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha is None or self.alpha > 0, f"alpha must be > 0 or None, got {self.alpha!r}.")
        require(self.lr > 0, f"lr must be > 0, got {self.lr!r}.")
        require(self.first_step in FIRST_STEPS, f"first_step must be one of {FIRST_STEPS}, got {self.first_step!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


@register(
    "lora_sb",
    config=LoraSBConfig,
    paper="Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning",
    url="https://arxiv.org/abs/2411.19557",
    family="F3",
    params="r*r",
    identity_at_init=False,  # the init IS the approximated first update; the base is not shifted
    layers=("linear", "conv1d"),
    calibration=True,
)
class LoraSB(AdapterModule):
    """x ↦ W₀x + s·B·R·A·x with frozen buffers B (out, r), A (r, in) and trained R (r, r)."""

    A: torch.Tensor
    B: torch.Tensor

    def __init__(self, cfg: LoraSBConfig, d_in: int, d_out: int, kind: str, weight: torch.Tensor):
        super().__init__()
        self.config, self.kind, self.scale = cfg, kind, cfg.scale
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        factory: dict[str, Any] = {"dtype": dtype, "device": weight.device}
        self.register_buffer("A", torch.zeros(cfg.r, d_in, **factory))  # (r, in), set by initialize, saved
        self.register_buffer("B", torch.zeros(d_out, cfg.r, **factory))  # (out, r)
        self.R = nn.Parameter(torch.zeros(cfg.r, cfg.r, **factory))  # (r, r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraSBConfig) -> LoraSB:
        d_in, d_out = L.dims(base)
        if cfg.r > min(d_in, d_out):
            raise ConfigError(
                f"lora_sb r={cfg.r} exceeds the rank of a layer with d_in={d_in}, d_out={d_out} "
                f"({min(d_in, d_out)}); lower r or leave that layer out of targets."
            )
        return cls(cfg, d_in, d_out, L.layer_kind(base), base.weight)  # type: ignore[arg-type]

    @classmethod
    def initialize(
        cls, model: nn.Module, adapters: dict[str, AdapterModule], cfg: LoraSBConfig, batches: list[dict] | None
    ) -> None:
        """G per targeted module from the calibration batches, then B, R, A from ΔW₁ (:meth:`set_from_gradient`)."""
        mine = {name: a for name, a in adapters.items() if isinstance(a, LoraSB)}
        rank = max(a.config.r for a in mine.values())
        data = as_batches(batches, need_labels=True, min_rows=rank, where="lora_sb")
        grads = full_gradients(model, list(mine), data)
        for name, adapter in mine.items():
            adapter.set_from_gradient(grads[name])

    def first_update(self, grad: torch.Tensor) -> torch.Tensor:
        """ΔW₁ (out, in) from the full gradient G: −η·G or −η·sign(G)."""
        g = grad.float()
        return -self.config.lr * (torch.sign(g) if self.config.first_step == "adam" else g)

    @torch.no_grad()
    def set_from_gradient(self, grad: torch.Tensor) -> None:
        """B = U_r, R = S_r/s, A = V_rᵀ with U S Vᵀ = SVD(ΔW₁): s·B·R·A = [ΔW₁]_r."""
        U, S, Vh = torch.linalg.svd(self.first_update(grad), full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        r = self.config.r
        self.B.copy_(U[:, :r])  # (out, r)
        self.A.copy_(Vh[:r])  # (r, in)
        self.R.copy_(torch.diag(S[:r]) / self.scale)  # (r, r)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        h = L.project_in(base, self.dropout(x), self.A)  # (..., r)
        h = torch.nn.functional.linear(h, self.R)  # (..., r)
        return y + (torch.nn.functional.linear(h, self.B) * self.scale).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return L.to_base_layout(base, self.scale * (self.B @ self.R @ self.A))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank r (A = A, B = B·R); with ``rank`` < r, the best rank-``rank`` truncation."""
        with torch.no_grad():
            f = LoraFactors(self.A.clone(), self.B @ self.R, self.scale)  # A (r, in), B (out, r)
        return f if rank is None else truncate(f, rank)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"lora_sb_A": self.A, "lora_sb_B": self.B, "lora_sb_R": self.R}

    @staticmethod
    def peft_fields(cfg: LoraSBConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.r if cfg.alpha is None else cfg.alpha}
