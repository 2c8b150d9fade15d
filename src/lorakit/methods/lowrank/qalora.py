"""QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models — https://arxiv.org/abs/2309.14717
Update rule: h = W₀x + s·B·A·(n·pool_g(x)), pool_g = the mean over each group of g inputs, n = in/g, s = α/r.

A is (r, in/g): the adapter sees the input averaged per group of g features (the ×n is PEFT's convention,
``QALoraLinearVariant``, so a saved dir is PEFT's ``use_qalora`` format with the same numbers). Hence
ΔW[o, j] = s·(n/g)·(B·A)[o, j // g] is constant over each group of g inputs: on an integer group-quantized
base with the same (or a dividing) group size (``lk.quantize(model, "int4g")``: g = 32) ``lk.merge`` adds
it to the zero points, z' = z − ΔW_group / s, codes unchanged, so the merged model stays quantized and
equals the unmerged one to float error (drift ≈ 0). On a dense base it merges as any ΔW; ``to_lora`` is the
exact rank-r form (A repeated over each group, times n/g). Init as LoRA: Kaiming-uniform A, zero B.

PEFT: ``use_qalora`` exists only on GPTQ layers (``peft.tuners.lora.gptq.GPTQLoraLinear``, needs gptqmodel);
on a plain or bitsandbytes model PEFT ignores the flag and refuses the (r, in/g) lora_A. Its forward on a
GPTQ-style layer equals ours (test); PEFT cannot merge it (no ``get_delta_weight``), lorakit can.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require

# option -> PEFT's adapter_config.json field
PEFT_NAMES = dict(
    r="r", alpha="lora_alpha", dropout="lora_dropout", rslora="use_rslora", group_size="qalora_group_size"
)


@dataclass(frozen=True, kw_only=True)
class QaloraConfig:
    r: int = 8
    """Rank of the update B·A."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rslora)."""
    group_size: int = 32
    """Inputs averaged into one pooled feature; must divide in_features of every targeted layer. Use the base's
    quantization group size (int4g: 32) or a multiple of it, so that merging stays on the integer grid."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input (before pooling) during training."""
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(
            isinstance(self.group_size, int) and self.group_size > 0,
            f"group_size must be a positive integer, got {self.group_size!r}.",
        )
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@register(
    "qalora",
    config=QaloraConfig,
    paper="QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models",
    url="https://arxiv.org/abs/2309.14717",
    family="F8",
    params="r*(d_in//group_size + d_out)",
    layers=("linear", "conv1d"),  # inputs of width in_features, pooled in groups (PEFT: Linear only)
)
class Qalora(AdapterModule):
    """x ↦ W₀x + s·B·A·(n·pool_g(x)) with A (r, in/g), B (out, r)."""

    peft_type = "LORA"

    def __init__(self, cfg: QaloraConfig, in_features: int, out_features: int, weight: torch.Tensor):
        super().__init__()
        self.config, self.scale, self.group = cfg, cfg.scale, cfg.group_size
        self.n_groups = in_features // cfg.group_size
        factory: dict[str, Any] = {
            "dtype": weight.dtype if weight.is_floating_point() else None,
            "device": weight.device,
        }
        self.A = nn.Parameter(torch.empty(cfg.r, self.n_groups, **factory))  # (r, in/g)
        self.B = nn.Parameter(torch.zeros(out_features, cfg.r, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: QaloraConfig) -> Qalora:
        in_features, out_features = L.dims(base)
        if in_features % cfg.group_size:
            raise ConfigError(
                f"qalora group_size={cfg.group_size} must divide the layer's in_features={in_features}; pick a "
                "divisor of every targeted layer's input width (the base's quantization group size, e.g. 32)."
            )
        return cls(cfg, in_features, out_features, base.weight)  # type: ignore[arg-type]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """n·pool_g(x): each group of g inputs averaged, times n = in/g; (..., in) -> (..., in/g)."""
        x = self.dropout(x).to(self.A.dtype)
        return x.unflatten(-1, (self.n_groups, self.group)).mean(-1) * self.n_groups  # (..., in/g, g) -> (..., in/g)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.pooled(x), self.A)  # (..., r)
        return y + (F.linear(h, self.B) * self.scale).to(y.dtype)  # (..., out)

    def expanded_A(self) -> torch.Tensor:
        """A over the full input, (r, in): each column of A repeated over its group, times n/g, so that
        A·(n·pool_g(x)) = expanded_A·x."""
        return self.A.repeat_interleave(self.group, dim=1) * (self.n_groups / self.group)  # (r, in)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        # (out, in/g) expanded per group: exactly constant over each group, which a zero-point merge needs
        grouped = self.scale * (self.n_groups / self.group) * (self.B @ self.A)  # (out, in/g)
        return L.to_base_layout(base, grouped.repeat_interleave(self.group, dim=1))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank r; with ``rank`` < r, the best rank-``rank`` truncation of s·B·expanded_A."""
        f = LoraFactors(self.expanded_A().detach(), self.B.detach(), self.scale)
        return f if rank is None else truncate(f, rank)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.A, "lora_B.weight": self.B}

    @staticmethod
    def peft_fields(cfg: QaloraConfig) -> dict[str, Any]:
        return {p: getattr(cfg, o) for o, p in PEFT_NAMES.items()} | {"use_dora": False, "use_qalora": True}

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> QaloraConfig | None:
        if fields.get("peft_type") != "LORA" or not fields.get("use_qalora"):
            return None
        if fields.get("use_dora"):
            raise ConfigError("use_dora together with use_qalora is not supported (PEFT does not support it either).")
        d = QaloraConfig()
        kwargs = {
            o: type(getattr(d, o))(getattr(d, o) if fields.get(p) is None else fields[p]) for o, p in PEFT_NAMES.items()
        }
        return QaloraConfig(**kwargs)
