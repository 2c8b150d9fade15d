"""LoRA-Mini: Adaptation Matrices Decomposition and Selective Training — https://arxiv.org/abs/2411.15804
Update rule: h = W₀x + s·B_out·B_in·A_in·A_out·x, A_out (a×in) and B_out (out×b) frozen, A_in (r×a), B_in (b×r) trained.

LoRA's A (r, in) and B (out, r) are each split into an outer, frozen factor and an inner, trained one:
A = A_in·A_out and B = B_out·B_in, so only r·(a + b) parameters train instead of r·(in + out), and
rank(ΔW) ≤ min(r, a, b). Choices the paper leaves open (we take the simplest faithful ones): the outer
factors are Kaiming-uniform like LoRA's A (U(±1/√fan_in)), drawn from a CPU ``torch.Generator`` seeded
with ``seed`` (A_out first, then B_out) and regenerated on attach and load instead of saved — an adapter
file holds only the inner factors, the storage saving the paper is after; layers of one shape share one
outer pair. A_in is Kaiming-uniform and B_in zero, so ΔW = 0 at init; s = alpha/r as in LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class LoraMiniConfig:
    r: int = 8
    """Rank of the update (the rank between the two trained inner factors)."""
    a: int = 64
    """Width of the frozen input-side factor A_out (a, in); A_in is (r, a)."""
    b: int = 64
    """Width of the frozen output-side factor B_out (out, b); B_in is (b, r)."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/r."""
    seed: int = 0
    """Seed of the generator that draws the frozen outer factors (they are regenerated from it, not saved)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        for name in ("r", "a", "b"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def outer_factors(cfg: LoraMiniConfig, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen (A_out (a, in), B_out (out, b)), Kaiming-uniform from a generator seeded with ``cfg.seed``."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    A_out = torch.empty(cfg.a, d_in).uniform_(-(d_in**-0.5), d_in**-0.5, generator=g)  # (a, in)
    B_out = torch.empty(d_out, cfg.b).uniform_(-(cfg.b**-0.5), cfg.b**-0.5, generator=g)  # (out, b)
    return A_out, B_out


@register(
    "lora_mini",
    config=LoraMiniConfig,
    paper="LoRA-Mini: Adaptation Matrices Decomposition and Selective Training",
    url="https://arxiv.org/abs/2411.15804",
    family="F2",
    params="r*(a+b)",
)
class LoraMini(AdapterModule):
    """x ↦ W₀x + s·B_out·B_in·A_in·A_out·x with frozen buffers A_out, B_out and trained A_in, B_in."""

    A_out: torch.Tensor
    B_out: torch.Tensor

    def __init__(self, cfg: LoraMiniConfig, d_in: int, d_out: int, kind: str, weight: torch.Tensor):
        super().__init__()
        self.config, self.kind, self.scale = cfg, kind, cfg.scale
        factory: dict[str, Any] = {
            "dtype": weight.dtype if weight.is_floating_point() else None,
            "device": weight.device,
        }
        A_out, B_out = outer_factors(cfg, d_in, d_out)
        self.register_buffer("A_out", A_out.to(**factory), persistent=False)  # (a, in), regenerated from the seed
        self.register_buffer("B_out", B_out.to(**factory), persistent=False)  # (out, b)
        self.A_in = nn.Parameter(torch.empty(cfg.r, cfg.a, **factory))  # (r, a)
        self.B_in = nn.Parameter(torch.zeros(cfg.b, cfg.r, **factory))  # (b, r)
        nn.init.kaiming_uniform_(self.A_in, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraMiniConfig) -> LoraMini:
        d_in, d_out = L.dims(base)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return cls(cfg, d_in, d_out, L.layer_kind(base), weight)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        h = L.project_in(base, self.dropout(x), self.A_out)  # (..., a)
        h = F.linear(F.linear(h, self.A_in), self.B_in)  # (..., r) -> (..., b)
        return y + (F.linear(h, self.B_out) * self.scale).to(y.dtype)  # (..., out)

    def factors(self) -> LoraFactors:
        """The plain LoRA pair A = A_in·A_out (r, in), B = B_out·B_in (out, r) and s."""
        return LoraFactors(self.A_in @ self.A_out, self.B_out @ self.B_in, self.scale)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        f = self.factors()
        return L.to_base_layout(base, f.scale * (f.B @ f.A))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank r (A = A_in·A_out, B = B_out·B_in); with ``rank`` < r, the best rank-``rank`` truncation."""
        with torch.no_grad():
            f = self.factors()
        return f if rank is None else truncate(f, rank)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"lora_mini_A_in": self.A_in, "lora_mini_B_in": self.B_in}

    @staticmethod
    def peft_fields(cfg: LoraMiniConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.alpha}
