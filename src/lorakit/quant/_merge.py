"""Merging an adapter into a quantized base layer, and the drift report of such a merge.

Semantics: W_q = dequantize(base); target = W_q + ΔW. ``requantize`` stores target quantized again with the
base's own kind (a quantized layer, as small as before; W_merged_q ≠ target in general); ``dequantize``
stores target itself in a full-precision nn.Linear (exact, but the layer is dense again). A kind with an
``absorb`` hook first tries to hold target exactly in its own stored form, codes unchanged (the integer group
kinds absorb a ΔW constant over each quantization group, as QA-LoRA's, into their zero points: drift ≈ 0).
The drift of a layer is ‖W_merged_q − (W_q + ΔW)‖_F; relative to ‖ΔW‖_F it says how much of the adapter the
re-quantization lost (≥ 1: as much as the whole update). On a calibration batch the report adds max |Δlogit|
and the mean KL(unmerged ‖ merged) per token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.quant._api import QUANTS, dense_linear, get_quant

MODES = ("requantize", "dequantize")


@dataclass
class MergeDrift:
    """What merging onto a quantized base changed, per layer and on a calibration batch."""

    mode: str  # "requantize" or "dequantize"
    drift: dict[str, float] = field(default_factory=dict)  # layer -> ‖W_merged_q − (W_q + ΔW)‖_F
    relative: dict[str, float] = field(default_factory=dict)  # layer -> that ÷ ‖ΔW‖_F
    max_abs_logit: float | None = None  # max |logits(unmerged) − logits(merged)| on the calibration batch
    kl: float | None = None  # mean per-token KL(unmerged ‖ merged) on it
    threshold: float = 0.5  # layers whose relative drift exceeds it are named in a warning
    reload_change: float | None = None  # max |Q(W) − W| of the merged layers' values W (see ``reload_change``)

    def over(self) -> list[str]:
        """The layers whose relative drift exceeds the threshold."""
        return [n for n, r in self.relative.items() if r > self.threshold]

    @classmethod
    def load(cls, path: str | Path) -> MergeDrift:
        """The report that :meth:`save` wrote to ``path``."""
        return cls(**json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON to ``path``."""
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")
        return Path(path)


def quant_kind(layer: nn.Module) -> str:
    """The registered quantization kind ('nf4', 'fp4', 'int8', 'int4g', ...) that made ``layer``."""
    own = getattr(layer, "quant_kind", None)  # lorakit's own quantized layers record the kind that made them
    quant_type = getattr(getattr(layer, "weight", None), "quant_type", None)  # Params4bit: 'nf4' or 'fp4'
    layer_kind = L.kind_of(layer)
    kind = own or quant_type or ("int8" if layer_kind is not None and layer_kind.name == "bnb8bit" else None)
    if kind not in QUANTS:
        raise ConfigError(
            f"cannot tell which quantization kind made {type(layer).__name__}; merge with quantized='dequantize'."
        )
    return str(kind)


def merge_layer(
    layer: nn.Module, delta: torch.Tensor, delta_bias: torch.Tensor | None, mode: str
) -> tuple[nn.Module, float, float]:
    """(the merged layer, its drift, ‖ΔW‖_F) for a quantized ``layer`` and an (out, in) ``delta`` (module docstring)."""
    if mode not in MODES:
        raise ConfigError(f"quantized must be one of {', '.join(MODES)}, got {mode!r}.")
    target = L.weight_out_in(layer).float() + delta.detach().float()  # (out, in)
    bias = L.base_bias(layer)
    if delta_bias is not None:
        bias = delta_bias.detach().float() + (0 if bias is None else bias.detach().float())
    dense = dense_linear(target, bias)
    spec = None if mode == "dequantize" else get_quant(quant_kind(layer))
    absorbed = None if spec is None or spec.absorb is None else spec.absorb(layer, delta.detach(), delta_bias)
    merged = dense if spec is None else absorbed if absorbed is not None else spec.fn(dense)
    merged.train(layer.training)
    drift = float((L.weight_out_in(merged).float() - target).norm())
    return merged, drift, float(delta.detach().float().norm())


def logit_drift(unmerged: torch.Tensor, merged: torch.Tensor) -> tuple[float, float]:
    """(max |Δlogit|, mean per-token KL(unmerged ‖ merged)) of two (..., V) logit tensors."""
    p_log = torch.log_softmax(unmerged.float(), dim=-1)
    q_log = torch.log_softmax(merged.float(), dim=-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean()
    return float((unmerged - merged).abs().max()), float(kl)


def reload_change(merged: nn.Module) -> float:
    """max |Q(W) − W| over the quantized layers of ``merged``, W a layer's dequantized weight and Q its own kind.

    A merged model is saved as these float values; 0 means reloading them with the same kind (``lk.load_base(dir,
    quantize=kind)``) gives back the very same quantized weights. NF4, FP4, int8 and a re-quantized int group
    layer map their own values onto themselves; zero points that absorbed a QA-LoRA ΔW in general do not.
    """
    worst = 0.0
    for layer in [m for m in merged.modules() if L.is_quantized(m)]:
        weight = L.weight_out_in(layer).float()  # (out, in)
        again = get_quant(quant_kind(layer)).fn(dense_linear(weight, L.base_bias(layer)))
        worst = max(worst, float((L.weight_out_in(again).float() - weight).abs().max()))
    return worst
