"""RandLoRA: Full-rank parameter-efficient fine-tuning of large models — https://arxiv.org/abs/2502.00987
Update rule: ΔW = (α/r)·Σ_{j=1..n} B_j·Λ_j·A·Γ_j over n = ⌈min(d_in, d_out)/r⌉ fixed random rank-r bases; only the
diagonals Λ_j (r) and Γ_j (min(d_in, d_out)) train, so ΔW reaches full rank at a fraction of LoRA's cost.

As PEFT's RandLoraModel: one A (r, 1, min_dim) and one B (max_dim, n_max, r) for all layers of an attach (sized by
the elementwise-largest (out, in)), Kaiming-uniform in bfloat16 from a CPU generator seeded with projection_prng_key
(A, then B one basis at a time), each divided by its std; sparse/very_sparse draw ternary {-1, 0, 1} bases. A layer
uses A[..., :min(d_in, d_out)] on its smaller side and B[:max(d_in, d_out), :n] on the larger one. Λ starts at 0 (the
base model) and Γ at 1/min(d_in, d_out). The bases are regenerated, never saved (save_projection: false); layers
built from one config object share them, created at first use and sized to the largest (as methods/vera.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require

_SAME = ("r", "projection_prng_key", "sparse", "very_sparse")  # options named as in PEFT's adapter_config.json
PEFT_NAMES = {o: o for o in _SAME} | {"alpha": "randlora_alpha", "dropout": "randlora_dropout"}  # option -> field


@dataclass(frozen=True, kw_only=True)
class RandLoraConfig:
    r: int = 32
    """Rank of each random basis; fewer, larger bases mean fewer trained parameters (PEFT's default 32)."""
    alpha: float = 640.0
    """Scaling numerator: the update is multiplied by alpha/r (PEFT's randlora_alpha, typically 20·r)."""
    projection_prng_key: int = 0
    """Seed of the generator that draws the shared bases (PEFT regenerates them from it, so keep it)."""
    sparse: bool = False
    """Ternary sparse bases: -1 and 1 with probability 1/6 each, else 0 (the paper's sparse variant)."""
    very_sparse: bool = False
    """Very sparse ternary bases: -1 and 1 with probability 1/(2√min_dim) each (overrides sparse)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(isinstance(self.projection_prng_key, int), "projection_prng_key must be an integer seed.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


def random_bases(cfg: RandLoraConfig, max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's shared (A (r, 1, min_dim), B (max_dim, n, r)), bit for bit, for the largest shape (max_out, max_in)."""
    g = torch.Generator(device="cpu").manual_seed(cfg.projection_prng_key)
    lo, hi, r = min(max_out, max_in), max(max_out, max_in), cfg.r
    n = -(-lo // r)  # bases for full rank
    if cfg.sparse or cfg.very_sparse:
        s = math.sqrt(lo) if cfg.very_sparse else 3.0
        ternary = [torch.rand(shape, generator=g) for shape in ((r, 1, lo), (hi, n, r))]
        A, B = ((u > 1 - 1 / (2 * s)).float() - (u < 1 / (2 * s)).float() for u in ternary)
    else:
        kaiming = lambda shape: nn.init.kaiming_uniform_(  # PEFT's _kaiming_init, drawn in bfloat16
            torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=g
        )
        A = kaiming((r, 1, lo))
        B = torch.cat([kaiming((hi, 1, r)) for _ in range(n)], dim=1)
    return A / A.std(), B / B.std()


class SharedBases(nn.Module):
    """The frozen bases shared by the layers of one attach: one submodule of all of them, empty until first use."""

    randlora_A: torch.Tensor
    randlora_B: torch.Tensor

    def __init__(self, cfg: RandLoraConfig):
        super().__init__()
        self.cfg, self.max_out, self.max_in = cfg, 0, 0
        self.register_buffer("randlora_A", torch.empty(0), persistent=False)  # (r, 1, min_dim) once generated
        self.register_buffer("randlora_B", torch.empty(0), persistent=False)  # (max_dim, n, r) once generated

    def get(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.randlora_A.numel() == 0:  # first use: generate, sized to the largest layer so far
            with torch.inference_mode(False), torch.no_grad():
                A, B = random_bases(self.cfg, self.max_out, self.max_in)
                self.randlora_A, self.randlora_B = A.to(like), B.to(like)
        return self.randlora_A, self.randlora_B


@register(
    "randlora",
    config=RandLoraConfig,
    paper="RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
    url="https://arxiv.org/abs/2502.00987",
    family="F2",
    params="-(-(d_in if d_in < d_out else d_out) // r) * (r + (d_in if d_in < d_out else d_out))",
    layers=("linear", "conv1d"),  # as PEFT's RandLoRA
)
class RandLora(AdapterModule):
    """x ↦ W₀x + s·Bf·((Λ ⊗ A ⊙ Γ)·x) (smaller side first), Λ (r, n) and Γ (n, min(d_in, d_out)) trained."""

    peft_type = "RANDLORA"

    def __init__(self, cfg: RandLoraConfig, d_in: int, d_out: int, shared: SharedBases, weight: torch.Tensor):
        super().__init__()
        self.config, self.d_in, self.d_out, self.shared, self.scale = cfg, d_in, d_out, shared, cfg.alpha / cfg.r
        lo = min(d_in, d_out)
        self.n = -(-lo // cfg.r)
        factory: dict[str, Any] = {"dtype": weight.dtype, "device": weight.device}
        self.randlora_lambda = nn.Parameter(torch.zeros(cfg.r, self.n, **factory))  # (r, n)
        self.randlora_gamma = nn.Parameter(torch.full((self.n, lo), 1 / lo, **factory))  # (n, lo); PEFT: 1/max(n, lo)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: RandLoraConfig) -> RandLora:
        return cls.from_bases({"": base}, {"": cfg})[""]  # type: ignore[return-value]

    @classmethod
    def from_bases(cls, bases: Mapping[str, nn.Module], cfgs: Mapping[str, Any]) -> dict[str, AdapterModule]:
        """One set of bases per config of this attach, sized to its largest layer."""
        groups: dict[RandLoraConfig, SharedBases] = {}
        for name, base in bases.items():
            shared = groups.setdefault(cfgs[name], SharedBases(cfgs[name]))
            d_in, d_out = L.dims(base)
            shared.max_out, shared.max_in = max(shared.max_out, d_out), max(shared.max_in, d_in)
        return {n: cls(cfgs[n], *L.dims(b), groups[cfgs[n]], L.weight_out_in(b)) for n, b in bases.items()}

    def factors(self) -> LoraFactors:
        """ΔW = scale·B·A as one LoRA of rank r·n: the scaled small basis on the smaller side, PEFT's order."""
        A, B = self.shared.get(self.randlora_lambda)
        lo, hi = min(self.d_in, self.d_out), max(self.d_in, self.d_out)
        lam, gam = self.randlora_lambda, self.randlora_gamma
        small = (lam[:, :, None] * A[:, :, :lo] * gam[None]).flatten(0, 1)  # (r·n, lo)
        large = B[:hi, : self.n].flatten(1)  # (hi, n·r)
        if self.d_in <= self.d_out:
            return LoraFactors(small, large, self.scale)  # (r·n, in), (out, n·r)
        return LoraFactors(large.T, small.T, self.scale)  # (n·r, in), (out, r·n)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        f = self.factors()
        h = F.linear(self.dropout(x).to(f.A.dtype), f.A)  # (..., r·n)
        return y + (F.linear(h, f.B) * f.scale).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        f = self.factors()
        return L.to_base_layout(base, f.scale * (f.B @ f.A))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank min(d_in, d_out) (ΔW is full rank in general); with ``rank``, the best truncation."""
        with torch.no_grad():
            f = self.factors()
        return truncate(f, min(rank or self.d_in, self.d_in, self.d_out))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"randlora_lambda": self.randlora_lambda, "randlora_gamma": self.randlora_gamma}

    @staticmethod
    def peft_fields(cfg: RandLoraConfig) -> dict[str, Any]:
        return {p: getattr(cfg, o) for o, p in PEFT_NAMES.items()} | {"save_projection": False, "init_weights": True}

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> RandLoraConfig | None:
        if fields.get("peft_type") != "RANDLORA":
            return None
        require(
            fields.get("save_projection", True) is False,
            "this RandLoRA dir stores its shared bases (save_projection: true); lorakit regenerates them from the "
            "seed projection_prng_key: re-save it with PEFT's RandLoraConfig(save_projection=False).",
        )
        d = RandLoraConfig()
        return RandLoraConfig(**{o: type(getattr(d, o))(fields.get(p) or getattr(d, o)) for o, p in PEFT_NAMES.items()})
