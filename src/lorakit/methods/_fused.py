"""One autograd node for a LoRA on a frozen nn.Linear: y = W·x + b + s·B·A·dropout(x).

Semantics: exactly ``F.linear(x, W, b) + s * F.linear(F.linear(dropout(x), A), B)``, where
dropout zeroes each input element independently with probability p and scales the rest by
1/(1-p) (``nn.Dropout``'s distribution); gradients for x, A and B only.

Why: autograd on the unfused chain makes separate passes over the (N, out) output for the scale
and the add, another over (N, in) to sum the two input gradients, and keeps the dropped input as
a float tensor. Here the LoRA product is added into the base output in place (``addmm_``) and the
input gradient is accumulated in place.

Dropout from ~p·n random numbers instead of n: drawing one Bernoulli number per input element
(``torch.native_dropout``) was the largest cost a LoRA added to a training step on CPU (0.4 s of
3.3 s at SmolLM2 shape; 1.5 ms for one 512 × 576 input). The dropped positions of an i.i.d.
Bernoulli(p) sequence are the partial sums of i.i.d. Geometric(p) gaps, so :func:`drop_positions`
draws only those (the same distribution as ``nn.Dropout``'s, from a different random stream).
Only the K dropped indices are saved (8·p bytes per input element; a bool mask takes 1); the
dropped input is rebuilt from them for the backward pass, in a reused buffer (``lorakit._buffers``).
The input gradient gets the LoRA part everywhere in one ``addmm_``, then the base part alone is
written back at the dropped positions (gathered before the add): no (N, in) temporary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit._buffers import scratch


def drop_positions(n: int, p: float, device: torch.device | None = None) -> torch.Tensor:
    """Sorted flat indices in [0, n) of an i.i.d. Bernoulli(p) draw over n elements (int64).

    Gaps between successive dropped positions are Geometric(p): G = ⌊log V / log(1-p)⌋ + 1 with V
    uniform on [0, 1), drawn in float64 from torch's default generator (seeded runs repeat).
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}.")
    if n == 0 or p == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    log_q = math.log1p(-p)
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    chunks, end = [], -1  # end: the last position drawn so far
    while end < n:
        m = int(mean + 6 * sd + 16)  # enough to pass n with overwhelming probability; else draw on
        v = torch.rand(m, dtype=torch.float64, device=device)  # [0, 1); V = 0 (odds 2⁻⁵³) gives G = n + 1
        # float64 holds these integer sums exactly; the clamp keeps gaps finite when p is tiny or V = 0
        positions = v.log_().div_(log_q).floor_().add_(1).clamp_(max=n + 1).cumsum_(0).add_(end)
        chunks.append(positions)
        end = int(positions[-1])
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[: int(torch.searchsorted(positions, n))].long()


def _dropped(x2: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """``x2`` with the elements at flat positions ``idx`` zeroed, in a scratch buffer; ``x2`` when none."""
    if idx is None:
        return x2
    xd = scratch(x2.shape, x2.dtype, x2.device, slot=0).copy_(x2)
    xd.view(-1).index_fill_(0, idx, 0.0)
    return xd


def frozen_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor | Callable[[], torch.Tensor] | None:
    """What LoraLinearFn takes as ``W`` for training on ``base`` with inputs of ``dtype``: a frozen nn.Linear's
    weight, or a quantized linear base's dequantizer (``layers.dequantized_forward``); None when neither applies
    (trainable weight or bias, another dtype, another layer type), and the caller takes the unfused path."""
    if not torch.is_grad_enabled():
        return None
    W: Any = base.weight if type(base) is nn.Linear else L.dequantized_forward(base, dtype)
    bias = L.base_bias(base) if W is not None else None
    if W is None or (isinstance(W, torch.Tensor) and (W.requires_grad or W.dtype != dtype)):
        return None
    return None if bias is not None and bias.requires_grad else W


class LoraLinearFn(torch.autograd.Function):
    """``W`` is the frozen (out, in) weight, or a function that builds it (a quantized base's dequantizer):
    then it is built again for the backward pass instead of being kept (QLoRA's memory saving)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W: torch.Tensor | Callable[[], torch.Tensor],
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        p: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        ctx.rebuild = None if isinstance(W, torch.Tensor) else W
        y = F.linear(x2, W if isinstance(W, torch.Tensor) else W(), bias)  # (N, out)
        idx = drop_positions(x2.numel(), p, x2.device) if p > 0 else None  # (K,) dropped flat positions
        keep = 1.0 / (1.0 - p)
        h = (_dropped(x2, idx) @ A.T).mul_(keep)  # (N, r)
        y.addmm_(h, B.T, alpha=scale)  # (N, out) += (N, r)(r, out)
        ctx.save_for_backward(x2, W if ctx.rebuild is None else None, A, B, h, idx)
        ctx.scale, ctx.keep, ctx.shape = scale, keep, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, W, A, B, h, idx = ctx.saved_tensors
        s, keep = ctx.scale, ctx.keep
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gh = (g @ B).mul_(s)  # (N, r)
        gB = (h.T @ g).T.mul_(s)  # (out, r); this order runs the faster kernel on CPU
        gA = (gh.T @ _dropped(x2, idx)).mul_(keep)  # (r, in)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g @ (W if ctx.rebuild is None else ctx.rebuild())  # (N, in)
            base_at_dropped = None if idx is None else gx.view(-1)[idx]  # the LoRA adds nothing there
            gx.addmm_(gh, A, alpha=keep)
            if base_at_dropped is not None:
                gx.view(-1).index_copy_(0, idx, base_at_dropped)
            gx = gx.view(ctx.shape)
        return gx, None, None, gA, gB, None, None
