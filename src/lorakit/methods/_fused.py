"""One autograd node for a LoRA on a frozen nn.Linear: y = W·x + b + s·B·A·dropout(x).

Semantics: exactly ``F.linear(x, W, b) + s * F.linear(F.linear(dropout(x), A), B)`` with dropout
drawn by ``torch.native_dropout`` (what ``nn.Dropout`` uses), gradients for x, A and B only.

Why: autograd on the unfused chain makes separate passes over the (N, out) output for the scale
and the add, another over (N, in) to sum the two input gradients, and keeps the dropped input as
a float tensor. Here the LoRA product is added into the base output in place (``addmm_``), the
input gradient is accumulated in place, and dropout keeps a bool mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        p: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = F.linear(x2, W, bias)  # (N, out)
        xd, mask = torch.native_dropout(x2, p, True) if p > 0 else (x2, None)  # (N, in), bool mask
        h = xd @ A.T  # (N, r)
        y.addmm_(h, B.T, alpha=scale)  # (N, out) += (N, r)(r, out)
        ctx.save_for_backward(x2, W, A, B, h, mask)
        ctx.scale, ctx.p, ctx.shape = scale, p, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, W, A, B, h, mask = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gh = (g @ B).mul_(s)  # (N, r)
        gB = (g.T @ h).mul_(s)  # (out, r)
        xd = x2 if mask is None else x2 * mask * (1.0 / (1.0 - p))  # (N, in), as native_dropout made it
        gA = gh.T @ xd  # (r, in)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g @ W  # (N, in)
            if mask is None:
                gx.addmm_(gh, A)
            else:
                gx.add_((gh @ A).mul_(mask), alpha=1.0 / (1.0 - p))
            gx = gx.view(ctx.shape)
        return gx, None, None, gA, gB, None, None
