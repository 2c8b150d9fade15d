"""SingLoRA: Low Rank Adaptation Using a Single Matrix — https://arxiv.org/abs/2507.05566
Update rule: h = W₀x + u(t)·(α/r)·A[:d_out]·A[:d_in]ᵀ·x, one A (max(d_in, d_out) × r), ramp u(t) = min(t/T, 1).

For a square W the update is the symmetric A·Aᵀ; for a rectangular one the paper's truncated variant:
the smaller side uses the first rows of A (A* = A[:min(d_in, d_out)]), so the parameter count is
r·max(d_in, d_out), half of LoRA's on a square layer. A is Kaiming-uniform (not zero: A·Aᵀ has no
gradient at A = 0), and the ramp u(t) starts at 0, so the adapted model starts as the base. t is a
saved step counter that advances once per forward in training mode with grad enabled (a micro-batch:
with gradient accumulation the ramp runs that many times faster; ``set_step`` sets it directly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class SingLoraConfig:
    r: int = 8
    """Rank of the single matrix A (max(d_in, d_out) × r)."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/r (the paper's α/r)."""
    ramp_steps: int = 100
    """T of the ramp u(t) = min(t/T, 1) in training steps (the paper leaves T to the user); 0 turns the ramp off."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(
            isinstance(self.ramp_steps, int) and self.ramp_steps >= 0,
            f"ramp_steps must be an integer >= 0 (0: no ramp), got {self.ramp_steps!r}.",
        )
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


@register(
    "singlora",
    config=SingLoraConfig,
    paper="SingLoRA: Low Rank Adaptation Using a Single Matrix",
    url="https://arxiv.org/abs/2507.05566",
    family="F2",
    params="r*(d_in if d_in > d_out else d_out)",
)
class SingLora(AdapterModule):
    """x ↦ W₀x + u(t)·s·A_out·(A_inᵀ·x) with A_out = A[:d_out] (out, r), A_in = A[:d_in] (in, r), s = α/r."""

    step: torch.Tensor

    def __init__(self, cfg: SingLoraConfig, d_in: int, d_out: int, kind: str, weight: torch.Tensor):
        super().__init__()
        self.config, self.d_in, self.d_out, self.scale = cfg, d_in, d_out, cfg.alpha / cfg.r
        dtype = weight.dtype if weight.is_floating_point() else None
        self.A = nn.Parameter(torch.empty(max(d_in, d_out), cfg.r, dtype=dtype, device=weight.device))  # (n, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=weight.device))  # t, saved
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: SingLoraConfig) -> SingLora:
        d_in, d_out = L.dims(base)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return cls(cfg, d_in, d_out, L.layer_kind(base), weight)

    def ramp(self) -> torch.Tensor:
        """u(t) = min(t/T, 1) as a 0-d tensor (1 when the ramp is off)."""
        T = self.config.ramp_steps
        return torch.ones((), device=self.step.device) if T == 0 else (self.step.float() / T).clamp(max=1.0)

    def set_step(self, t: int) -> None:
        """Set the training step t of the ramp (e.g. when resuming a run)."""
        self.step.fill_(int(t))

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.step += 1  # one more training step: the first one already sees u = 1/T > 0
        A = self.A
        h = L.project_in(base, self.dropout(x), A[: self.d_in].T)  # (..., r)
        out = torch.nn.functional.linear(h, A[: self.d_out])  # (..., out)
        return y + (out * (self.scale * self.ramp().to(out.dtype))).to(y.dtype)

    def factors(self) -> LoraFactors:
        """ΔW = scale·B·A with A = A[:d_in]ᵀ (r, in), B = A[:d_out] (out, r), scale = u(t)·α/r."""
        return LoraFactors(self.A[: self.d_in].T, self.A[: self.d_out], self.scale * float(self.ramp()))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        f = self.factors()
        return L.to_base_layout(base, f.scale * (f.B @ f.A))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank r; with ``rank`` (or r > min(d_in, d_out)), the best truncation to that rank."""
        f = self.factors()
        f = LoraFactors(f.A.detach(), f.B.detach(), f.scale)
        return truncate(f, min(rank or self.config.r, self.d_in, self.d_out))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"singlora_A": self.A, "singlora_step": self.step}

    @staticmethod
    def peft_fields(cfg: SingLoraConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.alpha}
