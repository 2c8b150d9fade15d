"""LoRA: Low-Rank Adaptation of Large Language Models — https://arxiv.org/abs/2106.09685
Update rule: h = W₀x + s·B·A·x, s = α/r (or α/√r with rsLoRA, https://arxiv.org/abs/2312.03732).

Wraps nn.Linear, GPT-2's Conv1D and nn.Embedding (where A·x is a row lookup of Aᵀ).
Init "default" is PEFT's: Kaiming-uniform A and zero B (for embeddings zero A, normal B);
"gaussian" draws A ~ N(0, 1/r²). Either way B·A = 0, so the adapted model starts as the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.init import _api as inits
from lorakit.lowrank import nested_B, truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require
from lorakit.methods._fused import LoraLinearFn, frozen_weight

# option -> PEFT's adapter_config.json field
PEFT_NAMES = dict(r="r", alpha="lora_alpha", dropout="lora_dropout", rslora="use_rslora", lora_bias="lora_bias")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    r: int = 8
    """Rank of the update B·A."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) (rsLoRA), which keeps the update's scale steady as r grows."""
    init: str = "default"
    """'default' (Kaiming-uniform A, zero B, as PEFT), 'gaussian' (A ~ N(0, 1/r²), zero B) or a registered
    init (``lorakit info`` lists them: pissa, eva, lora_ga, ...), which sets A and B when the adapter attaches."""
    init_options: Any = ()
    """Options of a registered init, e.g. {"niter": 4} for pissa (stored as sorted (name, value) pairs)."""
    train_only: str | None = None
    """'B': train only B over a frozen random row-orthonormal A (Asymmetry in LoRA, arXiv:2402.16842)."""
    lora_bias: bool = False
    """A trainable output bias b on B (PEFT's lora_bias): the update becomes s·(B·A·x + b)."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")
        require(self.train_only in (None, "B"), f"train_only must be None or 'B', got {self.train_only!r}.")
        inits.check_config(self)  # a registered init (pissa, eva, ...) and its options

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@register(
    "lora",
    config=LoraConfig,
    paper="LoRA: Low-Rank Adaptation of Large Language Models (+ rsLoRA scaling)",
    url="https://arxiv.org/abs/2106.09685",
    family="F1",
    params="(r*d_out if train_only == 'B' else r*(d_in+d_out)) + (d_out if lora_bias else 0)",
)
class Lora(AdapterModule):
    """x ↦ W₀x + s·B·A·x with A (r, in), B (out, r)."""

    peft_type = "LORA"
    rank_limit: int | None = None  # b: only the first b components, at scale α/b (DyLoRA, train/callbacks/dylora.py)

    def __init__(self, cfg: LoraConfig, in_features: int, out_features: int, kind: str, weight: torch.Tensor):
        super().__init__()
        self.config, self.kind, self.scale = cfg, kind, cfg.scale
        dtype = weight.dtype if weight.is_floating_point() else None
        factory: dict[str, Any] = {"dtype": dtype, "device": weight.device}
        self.A = nn.Parameter(torch.empty(cfg.r, in_features, **factory))  # (r, in)
        self.B = nn.Parameter(torch.empty(out_features, cfg.r, **factory))  # (out, r)
        self.b = nn.Parameter(torch.zeros(out_features, **factory)) if cfg.lora_bias else None  # (out,)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()
        self.reset_parameters()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraConfig) -> Lora:
        in_features, out_features = L.dims(base)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        require(not (cfg.lora_bias and L.layer_kind(base) == "embedding"), "lora_bias does not apply to embeddings.")
        return cls(cfg, in_features, out_features, L.layer_kind(base), weight)

    def reset_parameters(self) -> None:
        if self.config.train_only == "B":  # a random row-orthonormal A (A·Aᵀ = I), frozen; B = 0
            nn.init.orthogonal_(self.A)
            nn.init.zeros_(self.B)
        elif self.kind == "embedding":  # PEFT's embedding init: the roles of A and B swap
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)
        elif self.config.init == "gaussian":
            nn.init.normal_(self.A, std=1 / self.config.r)
            nn.init.zeros_(self.B)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.zeros_(self.B)

    def requires_grad_(self, requires_grad: bool = True) -> Lora:
        super().requires_grad_(requires_grad)
        if self.config.train_only == "B":
            self.A.requires_grad_(False)  # frozen for good: only B ever trains
        return self

    def out_B(self) -> torch.Tensor:  # (out, r): forward, merge and to_lora read it; comp_lora/salora project it
        return self.B if self.rank_limit is None else nested_B(self.B, self.rank_limit, self.config.rslora)

    def init_factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.A, self.B

    def lora_out(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """s·B·A·x, shape (..., out)."""
        h = L.project_in(base, self.dropout(x), self.A)  # (..., r)
        return torch.nn.functional.linear(h, self.out_B(), self.b) * self.scale  # (..., out)

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """Training on a frozen nn.Linear or a quantized linear base: base and adapter in one autograd node
        (methods/_fused.py); a quantized weight is dequantized for the forward and again for the backward."""
        hooked = base._forward_hooks or base._forward_pre_hooks or type(self).out_B is not Lora.out_B  # raw B only
        W = None if self.b is not None or hooked or x.dtype != self.A.dtype else frozen_weight(base, x.dtype)
        if W is None:
            return None
        p = float(getattr(self.dropout, "p", 0.0)) if self.training else 0.0
        return LoraLinearFn.apply(x, W, L.base_bias(base), self.A, self.out_B(), self.scale, p)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        B = self.out_B()
        dropout_on = self.training and not isinstance(self.dropout, nn.Identity)
        if torch.is_grad_enabled() or dropout_on or y.dtype != B.dtype or self.b is not None:  # the general path
            return y + self.lora_out(x, base).to(y.dtype)
        # Inference: y += s·(A·x)·Bᵀ in place — one rank-r GEMM over y, no y-sized temporaries.
        # Semantics: the line above (y is the base layer's fresh output, so writing into it is safe).
        h = L.project_in(base, x, self.A)  # (..., r)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), B.T, alpha=self.scale)  # (N, out) += (N, r)(r, out)
        return y

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return L.to_base_layout(base, self.scale * (self.out_B() @ self.A))  # (out, in) -> base layout

    def delta_bias(self) -> torch.Tensor | None:
        """The output shift s·b of lora_bias (merged into the base bias), or None."""
        return None if self.b is None else self.scale * self.b

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact; with ``rank`` < r, the best rank-``rank`` truncation of s·B·A. (An A/B pair has no lora_bias.)"""
        require(self.b is None, "to_lora cannot express lora_bias (an output shift); merge the adapter instead.")
        f = LoraFactors(self.A.detach(), self.out_B().detach(), self.scale)
        return f if rank is None else truncate(f, rank)

    def export_state(self) -> dict[str, torch.Tensor]:
        if self.kind == "embedding":
            return {"lora_embedding_A": self.A, "lora_embedding_B": self.B}
        bias = {} if self.b is None else {"lora_B.bias": self.b}
        return {"lora_A.weight": self.A, "lora_B.weight": self.B, **bias}

    @staticmethod
    def peft_fields(cfg: LoraConfig) -> dict[str, Any]:
        return {p: getattr(cfg, o) for o, p in PEFT_NAMES.items()} | {"use_dora": False} | inits.peft_fields(cfg)

    @staticmethod
    def lora_kwargs_from_peft(fields: dict[str, Any]) -> dict[str, Any]:
        d = {o: getattr(LoraConfig(), o) for o in PEFT_NAMES}
        kwargs = {o: type(d[o])(d[o] if fields.get(p) is None else fields[p]) for o, p in PEFT_NAMES.items()}
        return kwargs | inits.config_fields(fields)

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> LoraConfig | None:
        if fields.get("peft_type") != "LORA" or fields.get("use_dora") or fields.get("use_qalora"):
            return None  # DoRA and QA-LoRA read those
        return LoraConfig(**Lora.lora_kwargs_from_peft(fields))
