"""layers.store: W goes into a layer in its own storage — written into a dense weight in its layout, quantized
again in place with a quantized layer's own quantizer (the same codes and scales as quantizing a fresh Linear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import layers as L

X = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("base", [nn.Linear(64, 32), Conv1D(32, 64)], ids=["linear", "conv1d"])
def test_a_dense_layer_holds_w_in_its_layout(base):
    W = torch.randn(32, 64)  # (out, in)
    L.store(base, W)
    assert torch.equal(L.weight_out_in(base), W)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_a_quantized_layer_is_quantized_again_as_a_fresh_one(kind):
    pytest.importorskip("bitsandbytes")
    from lorakit.quant import get_quant

    torch.manual_seed(0)
    layer = get_quant(kind).fn(nn.Linear(64, 32))
    layer(X)  # after a forward (bitsandbytes may repack the codes or move them into the layer's state)
    W = torch.randn(32, 64)
    fresh = nn.Linear(64, 32)
    with torch.no_grad():
        fresh.weight.copy_(W), fresh.bias.copy_(layer.bias)
    want = get_quant(kind).fn(fresh)
    L.store(layer, W)
    assert L.is_quantized(layer) and torch.equal(L.weight_out_in(layer), L.weight_out_in(want))
    assert torch.equal(layer(X), want(X))
