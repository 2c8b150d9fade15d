"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning — https://arxiv.org/abs/2303.10512
Update rule: h = W₀x + s·P·diag(Λ)·Q·x, s = α/(r₀ + 1e-5), loss += w·mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F).

The SVD-form update of PEFT's AdaLoRA, with its keys and init: Q (``lora_A``, r×in) and P (``lora_B``, out×r)
~ N(0, 0.02²), Λ (``lora_E``, r×1) = 0, so the adapted model starts as the base. r₀ is the rank at attach
(PEFT's ``init_r``, its ``ranknum``), which the scale keeps after ranks are pruned. The rank allocation itself
is the ``adalora`` training callback (train/callbacks/adalora.py): it masks Λ during training and removes the
pruned triplets at the end, so a saved dir holds smaller tensors and PEFT's ``rank_pattern`` (boolean masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class AdaLoraConfig:
    r: int = 12
    """Rank of this module's P·Λ·Q (PEFT's init_r at attach; the ``adalora`` callback lowers it per module)."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/(r₀ + 1e-5), r₀ the rank at attach."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""
    orth_reg_weight: float = 0.5
    """Weight w of the orthogonality regulariser w·mean over P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F (PEFT's)."""
    ranknum: int | None = None
    """r₀ in the scale: the rank at attach (None: r); pruning changes r (down to 0) and keeps this."""

    def __post_init__(self) -> None:
        if self.ranknum is None:
            object.__setattr__(self, "ranknum", self.r)
        pruned = isinstance(self.ranknum, int) and self.ranknum > 0  # rank 0: a module the allocator emptied
        low = 0 if pruned else 1
        require(isinstance(self.r, int) and self.r >= low, f"r must be an integer >= {low}, got {self.r!r}.")
        require(isinstance(self.ranknum, int) and self.ranknum >= self.r, "ranknum must be an integer >= r.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")
        require(self.orth_reg_weight >= 0, f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / (float(self.ranknum or 0) + 1e-5)  # PEFT's scaling / (ranknum + 1e-5)


@register(
    "adalora",
    config=AdaLoraConfig,
    paper="AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
    url="https://arxiv.org/abs/2303.10512",
    family="F5",
    params="r*(d_in+d_out+1)",
    layers=("linear", "conv1d"),
)
class AdaLora(AdapterModule):
    """x ↦ W₀x + s·P·diag(Λ)·Q·x with Q (r, in), Λ = E (r, 1), P (out, r): PEFT's lora_A, lora_E, lora_B."""

    peft_type = "ADALORA"

    def __init__(self, cfg: AdaLoraConfig, in_features: int, out_features: int, weight: torch.Tensor):
        super().__init__()
        self.config, self.scale = cfg, cfg.scale
        factory: dict[str, Any] = {"dtype": weight.dtype if weight.is_floating_point() else None}
        factory["device"] = weight.device
        self.Q = nn.Parameter(torch.empty(cfg.r, in_features, **factory))  # (r, in)   Q, right singular vectors
        self.E = nn.Parameter(torch.zeros(cfg.r, 1, **factory))  # (r, 1)   Λ, singular values
        self.P = nn.Parameter(torch.empty(out_features, cfg.r, **factory))  # (out, r)  P, left singular vectors
        nn.init.normal_(self.Q, mean=0.0, std=0.02)
        nn.init.normal_(self.P, mean=0.0, std=0.02)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: AdaLoraConfig) -> AdaLora:
        in_features, out_features = L.dims(base)
        return cls(cfg, in_features, out_features, base.weight)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        h = L.project_in(base, self.dropout(x), self.Q * self.E)  # (..., r)
        return y + (torch.nn.functional.linear(h, self.P) * self.scale).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return L.to_base_layout(base, self.scale * (self.P @ (self.Q * self.E)))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact (A = Λ·Q, B = P); with ``rank`` < r, the best rank-``rank`` truncation."""
        f = LoraFactors((self.Q * self.E).detach(), self.P.detach(), self.scale)
        return f if rank is None else truncate(f, rank)

    def regularizer(self) -> torch.Tensor | None:
        """w·(‖QQᵀ − I‖_F + ‖PᵀP − I‖_F)/2: PEFT's penalty, whose mean over modules the loop adds to the loss."""
        if self.config.orth_reg_weight == 0:
            return None
        eye = torch.eye(self.config.r, dtype=self.Q.dtype, device=self.Q.device)  # (r, r)
        q = torch.linalg.matrix_norm(self.Q @ self.Q.T - eye)  # Frobenius
        p = torch.linalg.matrix_norm(self.P.T @ self.P - eye)
        return self.config.orth_reg_weight * (q + p) / 2

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.Q, "lora_B": self.P, "lora_E": self.E}

    @staticmethod
    def peft_fields(cfg: AdaLoraConfig) -> dict[str, Any]:
        """The adapter's fields; the allocator's schedule is a training option (the ``adalora`` callback), so
        target_r, tinit, tfinal, deltaT, beta1, beta2 and total_step carry PEFT's defaults (total_step 1)."""
        schedule = {"target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "total_step": 1}
        adapter = {"r": 8, "init_r": cfg.ranknum, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout}
        return adapter | schedule | {"orth_reg_weight": cfg.orth_reg_weight, "use_rslora": False, "use_dora": False}

    @staticmethod
    def peft_rank_pattern(ranks: dict[str, int], cfg: AdaLoraConfig) -> dict[str, Any]:
        """PEFT's form: ``{module.lora_E: mask over the r₀ initial triplets}`` (kept ones first)."""
        r0 = int(cfg.ranknum or 0)
        return {f"{m}.lora_E": [True] * k + [False] * (r0 - k) for m, k in ranks.items()}

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> AdaLoraConfig | None:
        if fields.get("peft_type") != "ADALORA":
            return None
        r0 = int(fields.get("init_r", 12))
        alpha = float(fields.get("lora_alpha", 8))
        return AdaLoraConfig(
            r=r0,
            alpha=alpha if alpha > 0 else float(r0),  # PEFT: scaling = lora_alpha if > 0 else r
            dropout=float(fields.get("lora_dropout") or 0.0),
            orth_reg_weight=float(fields.get("orth_reg_weight", 0.5)),
        )
