"""The fused LoRA training node equals autograd on the plain chain: outputs and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.methods._fused import LoraLinearFn


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_the_unfused_chain(p, bias):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias).requires_grad_(False)
    A = (torch.randn(4, 24) * 0.1).requires_grad_()
    B = (torch.randn(40, 4) * 0.1).requires_grad_()
    x0 = torch.randn(3, 5, 24)
    weights = torch.linspace(-1, 1, 40)  # a non-uniform upstream gradient
    results = []
    for fused in (False, True):
        torch.manual_seed(1)  # the same dropout draws on both sides
        x = x0.clone().requires_grad_()
        if fused:
            y = LoraLinearFn.apply(x, base.weight, base.bias, A, B, 2.0, p)
        else:
            y = base(x) + F.linear(F.linear(F.dropout(x, p, training=True), A), B) * 2.0
        (y * weights).sum().backward()
        results.append((y.detach(), x.grad, A.grad.clone(), B.grad.clone()))
        A.grad = B.grad = None
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_lora_uses_the_fused_node_only_where_it_applies():
    import lorakit as lk
    from lorakit.testing import tiny_llama

    model = tiny_llama()
    lk.attach(model, lk.method_config("lora", r=4), targets=["q_proj", "embed_tokens"])
    q = model.model.layers[0].self_attn.q_proj
    emb = model.model.embed_tokens
    x = torch.randn(2, 3, 64)
    assert q.adapters["default"].fused_forward(x, q.base_layer) is not None  # frozen Linear, grad on
    with torch.no_grad():
        assert q.adapters["default"].fused_forward(x, q.base_layer) is None  # inference: the in-place path
    assert emb.adapters["default"].fused_forward(torch.tensor([[1, 2]]), emb.base_layer) is None
    q.base_layer.weight.requires_grad_(True)  # a trainable base weight needs autograd's own graph
    assert q.adapters["default"].fused_forward(x, q.base_layer) is None
