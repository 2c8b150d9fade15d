"""EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models — https://arxiv.org/abs/2310.03270
Update rule: h = Q_t(W + s·B·A)·x + b, Q_t(w) = Δ_t·clamp(round(w/Δ_t), −2^(b−1), 2^(b−1)−1), s = α/r.

The LoRA is merged *before* quantization (the paper's QALoRA): the layer runs on the b-bit weight of W + s·B·A,
so a trained model deploys as integer codes with no adapter branch. Δ_t (out,) holds one symmetric step size per
output channel for each of ``timesteps`` diffusion timestep groups (row t is used while ``set_timestep(model, t)``
is in effect), learned by LSQ (Esser et al., arXiv:1902.08153): round() is straight-through, so A and B get the
gradient of W + s·B·A inside the grid (0 where clipped), and Δ gets ∂Q/∂Δ = round(v) − v inside, the clip level
outside (v = w/Δ), scaled by 1/sqrt(in·Q_p) (in weights per step size). The paper's per-timestep LSQ (TALSQ) is
on activation quantizers; here, as the method table asks, the step sizes per timestep are the weights' own and
activations stay full precision. Init: Kaiming A, zero B (the model starts as Q(W), not W), Δ = max|W_row|/Q_p.

``to_integer`` gives int8 codes and Δ_t whose product is bit for bit the weight the forward used (which runs
the base layer's own op on it: ``layers.forward_with``), so a layer holding codes·Δ_t reproduces the output
exactly. ``lk.merge`` folds the active timestep's Q_t(W + s·B·A) as W + ΔW (to float rounding); ``to_lora`` is
the SVD of that ΔW. Wraps Linear, GPT-2's Conv1D and Conv2d (groups=1, a tiny UNet's convolutions);
``lorakit.train.efficientdm.distill`` is the paper's data-free distillation from the full-precision model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.methods._api import AdapterModule, register, require


@dataclass(frozen=True, kw_only=True)
class EfficientdmConfig:
    r: int = 8
    """Rank of the update B·A, added to W before quantization."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/r."""
    bits: int = 4
    """Bits of the symmetric integer weight grid, 2 to 8 (codes in [−2^(b−1), 2^(b−1)−1], stored as int8)."""
    timesteps: int = 1
    """Sets of step sizes, one per diffusion timestep (group); ``set_timestep(model, t)`` picks one."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        bits_ok = isinstance(self.bits, int) and 2 <= self.bits <= 8
        require(bits_ok, f"bits must be an integer from 2 to 8 (int8 codes), got {self.bits!r}.")
        t_ok = isinstance(self.timesteps, int) and self.timesteps > 0
        require(t_ok, f"timesteps must be a positive integer (sets of step sizes), got {self.timesteps!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LsqQuant(torch.autograd.Function):
    """Q(w) = Δ·clamp(round(w/Δ), −q_n, q_p) per row of w (out, in) with Δ (out,); LSQ's gradients (module doc)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
        v = w / step[:, None]  # (out, in)
        codes = v.round().clamp(-qn, qp)  # (out, in), integers
        ctx.save_for_backward(v, codes)
        ctx.bounds, ctx.g = (qn, qp), 1.0 / math.sqrt(w.shape[1] * qp)
        return codes * step[:, None]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        v, codes = ctx.saved_tensors
        inside = (v >= -ctx.bounds[0]) & (v <= ctx.bounds[1])
        grad_step = (grad * torch.where(inside, codes - v, codes)).sum(1) * ctx.g  # (out,)
        return grad * inside, grad_step, None, None


@register(
    "efficientdm",
    config=EfficientdmConfig,
    paper="EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models (QALoRA + LSQ)",
    url="https://arxiv.org/abs/2310.03270",
    family="F8",
    params="r*(d_in+d_out) + timesteps*d_out",
    identity_at_init=False,  # the base runs quantized from the start
    layers=("linear", "conv1d", "conv2d"),
)
class Efficientdm(AdapterModule):
    """x ↦ Q_t(W + s·B·A)·x + b with A (r, in), B (out, r), step sizes Δ_t (out,); t = ``self.timestep``."""

    def __init__(self, cfg: EfficientdmConfig, weight: torch.Tensor):
        super().__init__()
        self.config, self.scale, self.timestep = cfg, cfg.scale, 0
        self.qn, self.qp = 2 ** (cfg.bits - 1), 2 ** (cfg.bits - 1) - 1
        out_features, in_features = weight.shape
        factory: dict[str, Any] = {"dtype": weight.dtype, "device": weight.device}  # a quantized base: dequantized
        self.A = nn.Parameter(torch.empty(cfg.r, in_features, **factory))  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_features, cfg.r, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        amax = weight.detach().float().abs().amax(1)  # (out,)
        step = torch.where(amax > 0, amax / self.qp, 1.0)  # a zero row: any Δ gives code 0
        # one Parameter per timestep: a step that trains one timestep leaves the others' out of the graph (and
        # out of the optimizer's update, momentum included)
        self.step = nn.ParameterList(nn.Parameter(step.to(**factory).clone()) for _ in range(cfg.timesteps))  # [(out,)]

    @classmethod
    def from_base(cls, base: nn.Module, cfg: EfficientdmConfig) -> Efficientdm:
        return cls(cfg, L.weight_out_in(base))  # (out, in); a Conv2d's flattened (out, in·kh·kw)

    def fake_quant(self, base: nn.Module, timestep: int | None = None) -> torch.Tensor:
        """Q_t(W + s·B·A), (out, in), at ``timestep`` (default: the active one); LSQ gradients under autograd."""
        t = self.timestep if timestep is None else timestep
        W = L.weight_out_in(base).to(self.A.dtype)  # (out, in)
        return LsqQuant.apply(W + self.scale * (self.B @ self.A), self.step[t], self.qn, self.qp)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        # y (W·x) is not used: the layer's own op runs on the quantized weight, as a layer holding it would
        return L.forward_with(base, x, self.fake_quant(base).to(x.dtype))

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """Training: the same output, without computing the unused full-precision base output."""
        return L.forward_with(base, x, self.fake_quant(base).to(x.dtype))

    def to_integer(self, base: nn.Module, timestep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (out, in) int8, Δ_t (out, 1)) of ``timestep`` (default: the active one): codes.to(Δ_t.dtype)·Δ_t
        is ``fake_quant`` bit for bit (``layers.to_base_layout`` turns it into the layer's weight)."""
        t = self.timestep if timestep is None else timestep
        require(0 <= t < len(self.step), f"timestep must be in [0, {len(self.step)}) (config timesteps), got {t}.")
        with torch.no_grad():
            step = self.step[t]  # (out,)
            codes = (self.fake_quant(base, t) / step[:, None]).round()  # (c·Δ)/Δ is c up to rounding: round() is c
        return codes.to(torch.int8), step.detach()[:, None].clone()

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW = Q_t(W + s·B·A) − W, (out, in)."""
        return self.fake_quant(base) - L.weight_out_in(base).to(self.A.dtype)

    def export_state(self) -> dict[str, torch.Tensor]:
        """``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r) and ``lsq_step.{t}`` (out,) per timestep t."""
        return {"lora_A.weight": self.A, "lora_B.weight": self.B} | {
            f"lsq_step.{t}": s for t, s in enumerate(self.step)
        }


def set_timestep(model: nn.Module, timestep: int) -> int:
    """Use step sizes ``timestep`` in every efficientdm adapter of ``model``; returns how many were set."""
    adapters = [m for m in model.modules() if isinstance(m, Efficientdm)]
    if not adapters:
        raise ConfigError("set_timestep found no efficientdm adapter; lk.attach(model, efficientdm config) first.")
    for a in adapters:
        if not (isinstance(timestep, int) and 0 <= timestep < a.config.timesteps):
            raise ConfigError(
                f"timestep must be an integer in [0, {a.config.timesteps}) (the config's timesteps), got {timestep!r}."
            )
    for a in adapters:
        a.timestep = timestep
    return len(adapters)
