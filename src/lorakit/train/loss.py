"""The training loss of a causal LM, with the output head and cross-entropy fused over row chunks.

Semantics: :func:`training_loss` returns what ``model(**batch).loss`` returns (transformers'
``ForCausalLMLoss``: logits upcast to float32, labels shifted left by one, mean over the tokens
whose label is not -100), with the same gradients.

Why: the model's own path materialises the (tokens × vocab) logits, their log-softmax and its
gradient, each a fresh ~100 MB tensor at B·T = 512 and a 49k vocabulary, then frees them: on a
CPU that is several full passes and, every step, page faults on memory the allocator has just
returned. Here the head runs over chunks of rows into a buffer of at most ``CHUNK_ELEMENTS``
logits; each chunk's softmax gradient is formed in place and multiplied back through the head at
once (the loss is a scalar, so d loss / d hidden is known up to the upstream factor in the forward
pass), and only that (tokens × hidden) gradient is kept for the backward pass. The head's weight
must be frozen (it is in adapter training; a trained head takes the model's own path).

Models whose forward does exactly ``lm_head(hidden)`` then ``ForCausalLMLoss`` (``FUSED_TYPES``)
take this path when the head is a plain frozen ``nn.Linear`` and autocast is off; every other
model calls the model. A batch without a supervised token gives what the model's path gives (a NaN
loss, zero gradients), without reading a value back to the host to find out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lorakit._buffers import scratch
from lorakit.methods._api import AdapterModule
from lorakit.models.heads import is_layout_only

FUSED_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # forward: logits = lm_head(h); loss = ForCausalLMLoss
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MB in float32: fewer rows run the head GEMM slower)
IGNORE = -100


def _logits(h: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 h·Wᵀ + b, into a reused buffer when the head is float32 (no fresh pages per chunk)."""
    if W.dtype != torch.float32:
        return torch.nn.functional.linear(h, W, bias).float()
    out = scratch((h.shape[0], W.shape[0]), torch.float32, h.device, slot=2)
    return torch.addmm(bias, h, W.T, out=out) if bias is not None else torch.mm(h, W.T, out=out)


class LinearCrossEntropyFn(torch.autograd.Function):
    """mean over labelled rows of cross_entropy(float(h · Wᵀ + b), label); h (M, d), labels (M,)."""

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        valid = labels != IGNORE
        count = valid.sum()
        rows = max(1, CHUNK_ELEMENTS // W.shape[0])
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], rows):
            chunk = slice(start, start + rows)
            z = _logits(h[chunk], W, bias)  # (rows, V), float32
            target = labels[chunk].clamp(min=0)[:, None]
            keep = valid[chunk]
            picked = z.gather(1, target).squeeze(1)  # (rows,) the target logits, before z is overwritten
            top = z.amax(dim=1, keepdim=True)  # (rows, 1)
            e = z.sub_(top).exp_()  # in place: torch.logsumexp takes a fresh (rows, V) temporary
            sums = e.sum(dim=1)  # (rows,)
            total += ((top.squeeze(1) + sums.log() - picked) * keep).sum()  # logsumexp − target logit
            if grad_h is not None:  # (softmax − one-hot) · keep / count, formed in e
                weight = keep / count.clamp(min=1)  # (rows,); no labelled row: zero gradients, as the model's
                e.mul_((weight / sums)[:, None]).scatter_add_(1, target, -weight[:, None])
                torch.mm(e.to(W.dtype), W, out=grad_h[chunk])  # (rows, d)
        ctx.save_for_backward(grad_h)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad.to(grad_h.dtype), None, None, None


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The model's head if :func:`training_loss` may fuse it, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSED_TYPES or not type(model).__name__.endswith("ForCausalLM"):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters()):
        return None  # an adapted (wrapped) or trained head: the model's own path
    hooks = [*head._forward_hooks.values(), *head._forward_pre_hooks.values()]
    if any(not is_layout_only(h) for h in hooks):
        return None  # a hook that may change values; a declared layout-only one (serving's) is harmless
    if torch.is_autocast_enabled(head.weight.device.type):
        return None
    return head


def regularization(adapters: Sequence[AdapterModule]) -> torch.Tensor | float:
    """The mean of the adapters' ``regularizer`` terms (None counts as absent), which the loop adds to the loss:
    AdaLoRA's orthogonality penalty is PEFT's w·mean over modules this way."""
    terms = [t for t in (a.regularizer() for a in adapters) if t is not None]
    return torch.stack(terms).mean() if terms else 0.0


def training_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model(**batch).loss`` for a batch with ``labels``, through the fused head where it applies."""
    head = fused_head(model)
    labels = batch.get("labels")
    if head is None or labels is None:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    backbone: Any = getattr(model, str(model.base_model_prefix))  # LlamaForCausalLM.model, ...
    hidden = backbone(**inputs).last_hidden_state  # (B, T, d)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:]  # tokens < n predict n
    return LinearCrossEntropyFn.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, shifted.reshape(-1))
