"""LoTR: Low Tensor Rank Weight Adaptation — https://arxiv.org/abs/2402.01376
Update rule: ΔW_l = s·U·G_l·Vᵀ, s = α/r, with U (out, r) and V (in, r) shared by the layers and a core G_l (r, r) each.

Stacking the layers' updates gives a Tucker-2 tensor ΔW[l] = U·G_l·Vᵀ, so L layers of one shape train
2·d·r + L·r² parameters instead of LoRA's 2·d·r·L. Layers of different shapes cannot share U and V: the
layers of one ``attach`` share them per (out, in) shape group on one device (the reference shares one pair
between the query and value projections of every block, all of one shape). A group belongs to one attach:
it is open while that attach builds its layers and closes when they are put in train/eval mode (which
attach does once all are built), so a second attach (another adapter, or the same config object on another
model) starts new groups. Layers whose config ``rank_pattern`` changed get a config of their own and hence
their own group. As the reference code: U, V ~ N(0, 1) and G_l = 0, so ΔW = 0 at init. The first layer of a
group saves U and V (``lotr_U``, ``lotr_V``); every layer saves its ``lotr_G``. Trainable parameters: r² per
layer (``params``) plus r·(in + out) per group (``shared_params``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class LotrConfig:
    r: int = 8
    """Rank of the shared factors U, V and side of each layer's core G_l."""
    alpha: float = 1.0
    """Scaling numerator: the update is multiplied by alpha/r (the reference's scale/rank, scale 1)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


class SharedFactors(nn.Module):
    """U (out, r) and V (in, r) of one shape group: a submodule of every member, so ``.to()`` moves it once."""

    def __init__(self, d_in: int, d_out: int, r: int, factory: dict[str, Any]):
        super().__init__()
        self.U = nn.Parameter(torch.randn(d_out, r, **factory))  # (out, r)
        self.V = nn.Parameter(torch.randn(d_in, r, **factory))  # (in, r)


@register(
    "lotr",
    config=LotrConfig,
    paper="LoTR: Low Tensor Rank Weight Adaptation",
    url="https://arxiv.org/abs/2402.01376",
    family="F2",
    params="r*r",  # per layer; U and V add r*(d_in+d_out) once per shape group (Lotr.shared_params)
)
class Lotr(AdapterModule):
    """x ↦ W₀x + s·U·(G·(Vᵀx)) with U (out, r), V (in, r) shared per shape group and G (r, r) per layer."""

    shared_params: ClassVar[str] = "r*(d_in+d_out)"  # trainable parameters of one shape group's U and V

    def __init__(self, cfg: LotrConfig, shared: SharedFactors, kind: str):
        super().__init__()
        self.config, self.scale, self.shared = cfg, cfg.alpha / cfg.r, shared
        self.owner = True  # the group's first layer saves U and V (from_bases clears it on the others)
        self.G = nn.Parameter(torch.zeros(cfg.r, cfg.r, dtype=shared.U.dtype, device=shared.U.device))  # (r, r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LotrConfig) -> Lotr:
        return cls.from_bases({"": base}, {"": cfg})[""]  # type: ignore[return-value]

    @classmethod
    def from_bases(cls, bases: Mapping[str, nn.Module], cfgs: Mapping[str, Any]) -> dict[str, AdapterModule]:
        """One U, V per shape group (config, in, out, device, dtype) of this attach; its first layer owns it."""
        groups: dict[tuple[Any, ...], SharedFactors] = {}
        out: dict[str, AdapterModule] = {}
        for name, base in bases.items():
            (d_in, d_out), weight, cfg = L.dims(base), L.weight_out_in(base), cfgs[name]
            factory = {"dtype": weight.dtype if weight.is_floating_point() else None, "device": weight.device}
            key = (cfg, d_in, d_out, str(factory["device"]), str(factory["dtype"]))
            owner = key not in groups
            if owner:
                groups[key] = SharedFactors(d_in, d_out, cfg.r, factory)
            out[name] = adapter = cls(cfg, groups[key], L.layer_kind(base))
            adapter.owner = owner
        return out

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        h = L.project_in(base, self.dropout(x), self.shared.V.T)  # (..., r) = Vᵀx
        h = torch.nn.functional.linear(h, self.G)  # (..., r) = G·Vᵀx
        return y + (torch.nn.functional.linear(h, self.shared.U) * self.scale).to(y.dtype)  # (..., out)

    def factors(self) -> LoraFactors:
        """ΔW = s·B·A with A = G·Vᵀ (r, in), B = U (out, r)."""
        return LoraFactors(self.G @ self.shared.V.T, self.shared.U, self.scale)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        f = self.factors()
        return L.to_base_layout(base, f.scale * (f.B @ f.A))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact (A = G·Vᵀ, B = U); with ``rank`` or r > min(d_in, d_out), the best truncation to that rank."""
        with torch.no_grad():
            f = self.factors()
        f = LoraFactors(f.A, f.B.detach(), f.scale)
        return truncate(f, min(rank or self.config.r, *f.A.shape[1:], f.B.shape[0]))

    def export_state(self) -> dict[str, torch.Tensor]:
        shared = {"lotr_U": self.shared.U, "lotr_V": self.shared.V} if self.owner else {}
        return {"lotr_G": self.G, **shared}

    @staticmethod
    def peft_fields(cfg: LotrConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout}
