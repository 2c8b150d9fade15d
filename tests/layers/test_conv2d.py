"""The conv2d base-layer kind: nn.Conv2d read as W (out, in·kh·kw) applied to each input patch; methods wrap it
only when they list the "conv2d" family, and grouped convolutions are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L


def conv(**kw) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(3, 5, (3, 2), **kw)


@pytest.mark.parametrize(
    "kw",
    [{}, {"stride": 2, "padding": 1}, {"dilation": 2, "padding": (2, 1)}, {"padding": 1, "padding_mode": "reflect"}],
)
def test_the_kind_reads_a_conv_as_a_patch_matrix(kw):
    base, x = conv(**kw), torch.randn(2, 3, 9, 8)
    assert L.layer_kind(base) == "conv2d" and L.dims(base) == (3 * 3 * 2, 5)
    W = L.weight_out_in(base)
    assert W.shape == (5, 18) and W.data_ptr() == base.weight.data_ptr()  # a view
    delta = torch.randn(5, 18)
    assert torch.equal(L.to_base_layout(base, delta).flatten(1), delta)
    # project_in: A (r, in·kh·kw) on every patch, as the layer's own convolution with A as its filters
    A = torch.randn(4, 18)
    patches = conv_like(base, x, torch.eye(18).view(18, 3, 3, 2))  # (N, 18, H', W'): each patch's values
    expected = torch.einsum("ri,nihw->nrhw", A, patches)
    torch.testing.assert_close(L.project_in(base, x, A), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(L.base_linear(base, x) + base.bias[:, None, None], base(x), atol=1e-6, rtol=0)
    assert torch.equal(L.forward_with(base, x, W), base(x))  # the layer's own op, bit for bit
    assert torch.equal(L.forward_with(base, x, 2 * W), conv_like(base, x, 2 * base.weight, base.bias))


def conv_like(base: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    return base._conv_forward(x, weight, bias)


def test_grouped_convolutions_are_refused_clearly():
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    assert L.layer_kind(grouped) == "conv2d"
    with pytest.raises(lk.ConfigError, match="groups=2.*Leave grouped/depthwise convolutions out of targets"):
        L.dims(grouped)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(lk.ConfigError, match="groups=4"):
        lk.attach(model, lk.method_config("efficientdm"), targets=["0"])


def test_methods_that_do_not_list_conv2d_refuse_it_and_all_linear_skips_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.raises(lk.TargetError, match=r"method 'lora' cannot wrap 0 \(Conv2d\); it supports linear"):
        lk.attach(model, lk.method_config("lora"), targets=["0"])
    lk.attach(model, lk.method_config("lora"), targets="all-linear")
    assert lk.adapter_names(model) == ["default"] and isinstance(model[0], nn.Conv2d)  # only the Linear wrapped
