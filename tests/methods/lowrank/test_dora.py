"""DoRA: the merged weight's row norms equal the magnitude vector; init is the identity."""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.methods.lowrank.dora import Dora
from lorakit.testing import randomize_adapters


def _bases():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # (out=24, in=16)
    nn.init.normal_(conv.weight)
    return [nn.Linear(16, 24), conv, nn.Embedding(50, 24)]


def test_magnitude_starts_at_row_norms_so_gain_is_one():
    for base in _bases():
        adapter = Dora.from_base(base, lk.method_config("dora", r=4))
        torch.testing.assert_close(adapter.m, L.weight_out_in(base).norm(dim=1))
        torch.testing.assert_close(adapter.gain(base), torch.ones_like(adapter.m))


def test_merged_weight_has_row_norms_equal_to_magnitude():
    """The decomposition W' = m · V/‖V‖: each output row of the merged weight has norm m."""
    for base in _bases():
        adapter = Dora.from_base(base, lk.method_config("dora", r=4))
        randomize_adapters(adapter, std=0.3)
        adapter.m.data.abs_()  # a norm is non-negative; a negative m flips the row instead
        merged = L.weight_out_in(base) + L.to_base_layout(base, adapter.delta_weight(base))
        torch.testing.assert_close(merged.norm(dim=1), adapter.m, atol=1e-5, rtol=1e-5)


def test_direction_is_that_of_w_plus_scaled_ba():
    base = nn.Linear(16, 24)
    adapter = Dora.from_base(base, lk.method_config("dora", r=4, alpha=8))
    randomize_adapters(adapter, std=0.3)
    adapter.m.data.abs_()
    merged = base.weight + adapter.delta_weight(base)
    V = base.weight + 2.0 * adapter.B @ adapter.A
    cos = nn.functional.cosine_similarity(merged, V, dim=1)
    torch.testing.assert_close(cos, torch.ones(24), atol=1e-6, rtol=0)


def test_norm_is_detached_in_backward():
    """§4.3 of the paper: ‖W + ΔW‖ is a constant for the gradient, so ∂out/∂m = out/m exactly."""
    base = nn.Linear(16, 24)
    adapter = Dora.from_base(base, lk.method_config("dora", r=4))
    randomize_adapters(adapter, std=0.3)
    x = torch.randn(3, 16)
    out = adapter(x, base, base(x))
    out.sum().backward()
    expected = ((out.detach() - base.bias) / adapter.m.detach()).sum(0)
    torch.testing.assert_close(adapter.m.grad, expected, atol=1e-5, rtol=1e-5)
