"""VeRA: Vector-based Random Matrix Adaptation — https://arxiv.org/abs/2310.11454
Update rule: h = W₀x + Λ_b·B·Λ_d·A·x, with A, B frozen random matrices shared by all layers and only b, d trained.

As PEFT's VeraModel: one A (r, max d_in) and one B (max d_out, r) for every layer an attach
targets, Kaiming-uniform from a CPU generator seeded with ``projection_prng_key`` (A drawn first),
and each layer uses A[:, :d_in] and B[:d_out]; b starts at 0 (so the model starts as the base) and
d at ``d_initial``. The projection is regenerated, not saved (``save_projection: false`` in PEFT's
config). The layers built from one config object share one projection, created at their first use
and sized to the largest of them — for one ``attach`` or ``load_adapter`` call that is PEFT's choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class VeraConfig:
    r: int = 256
    """Rank of the shared random projections (PEFT's default; VeRA affords far higher r than LoRA)."""
    projection_prng_key: int = 0
    """Seed of the generator that draws the shared A and B (PEFT regenerates them from it, so keep it)."""
    d_initial: float = 0.1
    """Initial value of every entry of the scaling vector d (the paper's Table 6c favours ≤ 0.1)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(isinstance(self.projection_prng_key, int), "projection_prng_key must be an integer seed.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: U(−b, b) with b = √3·√2/√fan_in, drawn from ``generator`` (same float steps)."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class SharedProjection(nn.Module):
    """The frozen (A, B) pair shared by the layers of one attach; one submodule of all of them, so ``.to()``
    moves it once. Its buffers are empty until first use, which fixes the size (the largest layer so far)."""

    vera_A: torch.Tensor
    vera_B: torch.Tensor

    def __init__(self, seed: int, r: int):
        super().__init__()
        self.seed, self.r, self.max_in, self.max_out = seed, r, 0, 0
        self.register_buffer("vera_A", torch.empty(0), persistent=False)  # (r, max_in) once generated
        self.register_buffer("vera_B", torch.empty(0), persistent=False)  # (max_out, r) once generated

    @property
    def generated(self) -> bool:
        return self.vera_A.numel() > 0

    def get(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.generated:
            with torch.inference_mode(False), torch.no_grad():
                g = torch.Generator(device="cpu").manual_seed(self.seed)
                A = kaiming_uniform((self.r, self.max_in), g)  # (r, max_in), drawn first as PEFT
                B = kaiming_uniform((self.max_out, self.r), g)  # (max_out, r)
                self.vera_A, self.vera_B = A.to(like), B.to(like)
        return self.vera_A, self.vera_B


@register(
    "vera",
    config=VeraConfig,
    paper="VeRA: Vector-based Random Matrix Adaptation",
    url="https://arxiv.org/abs/2310.11454",
    family="F2",
    params="r+d_out",
    layers=("linear", "conv1d"),  # as PEFT's VeRA
)
class Vera(AdapterModule):
    """x ↦ W₀x + b ⊙ (B·(d ⊙ (A·x))) with shared frozen A (r, in), B (out, r) and trained b (out,), d (r,)."""

    peft_type = "VERA"

    def __init__(self, cfg: VeraConfig, d_in: int, d_out: int, shared: SharedProjection, weight: torch.Tensor):
        super().__init__()
        self.config, self.d_in, self.d_out, self.shared = cfg, d_in, d_out, shared
        factory: dict[str, Any] = {
            "dtype": weight.dtype if weight.is_floating_point() else None,
            "device": weight.device,
        }
        self.vera_lambda_b = nn.Parameter(torch.zeros(d_out, **factory))  # (out,)
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), cfg.d_initial, **factory))  # (r,)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: VeraConfig) -> Vera:
        return cls.from_bases({"": base}, {"": cfg})[""]  # type: ignore[return-value]

    @classmethod
    def from_bases(cls, bases: Mapping[str, nn.Module], cfgs: Mapping[str, Any]) -> dict[str, AdapterModule]:
        """One projection per config of this attach, sized to its largest layer (rank_pattern: one per r)."""
        groups: dict[VeraConfig, SharedProjection] = {}
        for name, base in bases.items():
            shared = groups.setdefault(cfgs[name], SharedProjection(cfgs[name].projection_prng_key, cfgs[name].r))
            d_in, d_out = L.dims(base)
            shared.max_in, shared.max_out = max(shared.max_in, d_in), max(shared.max_out, d_out)
        return {n: cls(cfgs[n], *L.dims(b), groups[cfgs[n]], b.weight) for n, b in bases.items()}  # type: ignore[arg-type]

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices A[:, :d_in] (r, in) and B[:d_out] (out, r) of the shared pair."""
        A, B = self.shared.get(self.vera_lambda_d)
        return A[:, : self.d_in], B[: self.d_out]

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        A, B = self.projections()
        h = torch.nn.functional.linear(self.dropout(x).to(A.dtype), A) * self.vera_lambda_d  # (..., r)
        return y + (torch.nn.functional.linear(h, B) * self.vera_lambda_b).to(y.dtype)  # (..., out)

    def factors(self) -> LoraFactors:
        A, B = self.projections()
        return LoraFactors(self.vera_lambda_d[:, None] * A, self.vera_lambda_b[:, None] * B, 1.0)  # (r, in), (out, r)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        f = self.factors()
        return L.to_base_layout(base, f.B @ f.A)  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact (A = Λ_d·A, B = Λ_b·B); with ``rank`` or r > min(d_in, d_out), the best truncation to that rank."""
        with torch.no_grad():
            f = self.factors()
        return truncate(f, min(rank or self.config.r, self.d_in, self.d_out))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    @staticmethod
    def peft_fields(cfg: VeraConfig) -> dict[str, Any]:
        return {
            "r": cfg.r,
            "projection_prng_key": cfg.projection_prng_key,
            "save_projection": False,
            "vera_dropout": cfg.dropout,
            "d_initial": cfg.d_initial,
            "init_weights": True,
        }

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> VeraConfig | None:
        if fields.get("peft_type") != "VERA":
            return None
        require(
            fields.get("save_projection", True) is False,
            "this VeRA adapter stores its shared projection (save_projection: true); lorakit regenerates it from "
            "projection_prng_key and loads VeRA dirs saved with save_projection=False (PEFT: "
            "VeraConfig(save_projection=False)); re-save it that way.",
        )
        return VeraConfig(
            r=int(fields.get("r", 256)),
            projection_prng_key=int(fields.get("projection_prng_key", 0)),
            d_initial=float(fields.get("d_initial", 0.1)),
            dropout=float(fields.get("vera_dropout", 0.0) or 0.0),
        )
