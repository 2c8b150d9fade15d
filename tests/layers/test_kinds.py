"""Base-layer kinds: the registry dispatches on the layer's class, and a new kind is one registered class: every
method that wraps its family then works on it unchanged (here a Linear stored transposed, as a stand-in for a
quantized or otherwise re-laid-out Linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.layers._api import _BY_TYPE, KINDS, register_kind


def test_the_builtin_kinds_and_a_clear_error_for_other_layers():
    assert {k: KINDS[k].family for k in ("linear", "conv1d", "embedding", "conv2d")} == {
        "linear": "linear",
        "conv1d": "conv1d",
        "embedding": "embedding",
        "conv2d": "conv2d",
    }
    assert [L.layer_kind(m) for m in (nn.Linear(3, 2), Conv1D(2, 3), nn.Embedding(5, 2), nn.Conv2d(2, 3, 3))] == [
        "linear",
        "conv1d",
        "embedding",
        "conv2d",
    ]
    assert L.dims(Conv1D(2, 3)) == (3, 2) and L.dims(nn.Embedding(5, 2)) == (5, 2)
    with pytest.raises(lk.TargetError, match=r"module 'x' is a torch.nn.modules.conv.Conv3d.*supported types are"):
        L.layer_kind(nn.Conv3d(1, 1, 1), "x")


class TransposedLinear(nn.Module):
    """y = x·W + b with W stored (in, out): not an nn.Linear, so no built-in kind matches it."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


@pytest.fixture
def transposed_kind():
    @register_kind
    class Transposed:
        name, family, types, quantized = "transposed_linear", "linear", (TransposedLinear,), False
        dims = staticmethod(lambda base: (base.weight.shape[0], base.weight.shape[1]))
        weight_out_in = staticmethod(lambda base: base.weight.T)
        to_base_layout = staticmethod(lambda base, delta: delta.T)
        project_in = staticmethod(lambda base, x, A: F.linear(x.to(A.dtype), A))
        base_linear = staticmethod(lambda base, x: x @ base.weight)
        base_bias = staticmethod(lambda base: base.bias)

    yield Transposed
    KINDS.pop("transposed_linear")
    _BY_TYPE.clear()


OPTIONS = {"fourierft": {"n_frequency": 50}}  # fewer than the 96 entries of the smaller layer


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "fourierft"])
def test_a_registered_kind_is_wrapped_by_every_method_of_its_family(transposed_kind, method):
    torch.manual_seed(0)
    model = nn.Sequential(TransposedLinear(16, 12), nn.ReLU(), TransposedLinear(12, 8))
    plain = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))  # the same maps as nn.Linear
    with torch.no_grad():
        for ours, ref in ((model[0], plain[0]), (model[2], plain[2])):
            ref.weight.copy_(ours.weight.T)
            ref.bias.copy_(ours.bias)
    assert L.layer_kind(model[0]) == "linear"  # methods see the family; the kind decides how it is read
    x = torch.randn(5, 16)
    for m in (model, plain):
        torch.manual_seed(1)
        lk.attach(m, lk.method_config(method, **OPTIONS.get(method, {})), targets=["0", "2"])
        with torch.no_grad():
            for p in (p for p in m.parameters() if p.requires_grad):
                torch.manual_seed(p.numel())
                p.add_(torch.randn(p.shape) * 0.1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)
        merged = lk.merge(model)
        torch.testing.assert_close(merged(x), plain(x), atol=1e-5, rtol=1e-5)
    assert isinstance(merged[0], TransposedLinear)
