"""BoRA: W' = diag(g_out)·(W₀ + s·B·A)·diag(g_in) from two detached normalisations (per output, then per input);
W' = W₀ at init; with the input gain at 1 it is exactly lorakit's DoRA; merged = unmerged; DoRA's count + d_in."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.lowrank.bora import Bora
from lorakit.methods.lowrank.dora import Dora
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import tokens

X = tokens()
KINDS = ["linear", "conv1d", "embedding"]


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        conv = Conv1D(24, 16)  # (out=24, in=16)
        nn.init.normal_(conv.weight)
        return conv
    return nn.Linear(16, 24) if kind == "linear" else nn.Embedding(50, 24)


def inputs(base: nn.Module) -> torch.Tensor:
    return torch.randint(0, 50, (2, 5)) if isinstance(base, nn.Embedding) else torch.randn(2, 5, 16)


def apply(base: nn.Module, W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer with weight W (out, in) in place of W₀."""
    return W.T[x] if isinstance(base, nn.Embedding) else x @ W.T + base.bias


def reference_weight(adapter: Bora, base: nn.Module) -> torch.Tensor:
    """The two normalisation steps written out: D = m ⊙ V/‖V‖_row, then W' = D ⊙ m_in/‖D‖_col."""
    V = L.weight_out_in(base).detach() + adapter.scale * (adapter.B @ adapter.A).detach()
    D = adapter.m.detach()[:, None] * V / V.norm(dim=1, keepdim=True)
    return D * adapter.m_in.detach()[None, :] / D.norm(dim=0, keepdim=True)


def noisy(base: nn.Module, **opts) -> Bora:
    adapter = Bora.from_base(base, lk.method_config("bora", r=4, alpha=8.0, **opts)).eval()
    randomize_adapters(adapter, std=0.3)
    return adapter


@pytest.mark.parametrize("kind", KINDS)
def test_at_init_the_merged_weight_is_the_base_weight(kind):
    base = make_base(kind)
    adapter = Bora.from_base(base, lk.method_config("bora", r=4)).eval()
    assert adapter.delta_weight(base).abs().max() < 1e-6
    x = inputs(base)
    torch.testing.assert_close(adapter(x, base, base(x)), base(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_the_two_step_normalised_weight_and_merge_is_exact(kind):
    base = make_base(kind)
    adapter = noisy(base)
    W1 = reference_weight(adapter, base)  # (out, in)
    x = inputs(base)
    torch.testing.assert_close(adapter(x, base, base(x)), apply(base, W1, x), atol=1e-5, rtol=1e-5)
    merged = L.weight_out_in(base).detach() + L.to_base_layout(base, adapter.delta_weight(base)).detach()
    torch.testing.assert_close(merged, W1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(W1.norm(dim=0), adapter.m_in.detach().abs())  # per-input norms are |m_in|


@pytest.mark.parametrize("kind", KINDS)
def test_with_an_input_gain_of_one_the_layer_equals_dora(kind):
    base = make_base(kind)
    bora = noisy(base)
    dora = Dora.from_base(base, lk.method_config("dora", r=4, alpha=8.0)).eval()
    with torch.no_grad():
        for name in ("A", "B", "m"):
            getattr(dora, name).copy_(getattr(bora, name))
        g_out, _ = bora.gains(base)
        V = L.weight_out_in(base) + bora.scale * bora.B @ bora.A
        bora.m_in.copy_((g_out[:, None] * V).norm(dim=0))  # m_in = ‖D‖_col: the second step is the identity
    x = inputs(base)
    y = dora(x, base, base(x))
    assert (y - base(x)).abs().max() > 1e-2
    torch.testing.assert_close(bora(x, base, base(x)), y, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        bora.m_in.mul_(1.5)  # any other input magnitude leaves DoRA's function class
    assert (bora(x, base, base(x)) - y).abs().max() > 1e-2


@pytest.mark.parametrize("make, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc", "wte"])])
def test_trains_both_magnitudes_and_counts_doras_parameters_plus_d_in(make, targets):
    counts = {}
    for method in ("bora", "dora"):
        model = make()
        lk.attach(model, lk.method_config(method, r=4), targets=targets)
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d_in_total = sum(L.dims(w.base_layer)[0] for _, w in wrappers(model))
    assert counts["bora"] == counts["dora"] + d_in_total
    model = make()
    lk.attach(model, lk.method_config("bora", r=4), targets=targets)
    randomize_adapters(model, std=0.05)
    model.train()
    model(X, labels=X).loss.backward()
    for _, w in wrappers(model):
        assert w.adapters["default"].m.grad.abs().sum() > 0 and w.adapters["default"].m_in.grad.abs().sum() > 0


def test_training_dropout_uses_one_mask_for_both_paths():
    base = make_base("linear")
    adapter = noisy(base, dropout=0.5).train()
    x = inputs(base)
    torch.manual_seed(3)
    with torch.no_grad():
        y = adapter(x, base, base(x))
    torch.manual_seed(3)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)
    W0, W1 = L.weight_out_in(base).detach(), reference_weight(adapter, base)
    torch.testing.assert_close(y, base(x) - xd @ W0.T + xd @ W1.T, atol=1e-5, rtol=1e-5)  # W₀·x − W₀·xd + W'·xd


def test_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="BoRA does not support lora_bias"):
        lk.method_config("bora", lora_bias=True)
    with pytest.raises(lk.ConfigError, match="r must be a positive integer"):
        lk.method_config("bora", r=0)
    assert Bora.config_from_peft({"peft_type": "LORA", "use_dora": True}) is None  # a PEFT DoRA dir stays DoRA
