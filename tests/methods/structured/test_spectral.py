"""Spectral Adapter: the merged weight is W's SVD with the top-r singular vectors tuned — additively (U_r + B,
V_r + Aᵀ) or by Cayley rotations (U_r·R_U, V_r·R_V); it equals W at init, rotations keep U_r·R_U orthonormal
while training, merge == forward, and the trainable counts are r·(d_in + d_out) and 2r²."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.spectral import Spectral
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()


def _bases():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # (out=24, in=16)
    nn.init.normal_(conv.weight)
    return [nn.Linear(16, 24), conv, nn.Embedding(50, 24)]


def reference_weight(adapter: Spectral, W: torch.Tensor) -> torch.Tensor:
    """The paper's tuned weight from the full SVD of W: [U_r', U_⊥]·Σ·[V_r', V_⊥]ᵀ."""
    r = adapter.config.r
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    sign = torch.sign((U[:, :r] * adapter.U).sum(0))  # match the adapter's sign-fixed singular pairs
    U, Vh = U.clone(), Vh.clone()
    U[:, :r], Vh[:r] = U[:, :r] * sign, Vh[:r] * sign[:, None]
    if adapter.config.mode == "additive":
        U[:, :r], Vh[:r] = U[:, :r] + adapter.B, Vh[:r] + adapter.A
    else:
        R_U, R_V = adapter.rotations()
        U[:, :r], Vh[:r] = U[:, :r] @ R_U, (Vh[:r].T @ R_V).T
    return (U * S) @ Vh


@pytest.mark.parametrize("mode", ["additive", "rotation"])
def test_merged_weight_is_the_tuned_svd_and_equals_w_at_init(mode):
    for base in _bases():
        adapter = Spectral.from_base(base, lk.method_config("spectral", r=3, mode=mode))
        W = L.weight_out_in(base).detach()  # (out, in)
        assert torch.equal(adapter.delta_weight(base), torch.zeros_like(base.weight))  # merged W is W at init
        randomize_adapters(adapter, std=0.3)
        merged = W + L.to_base_layout(base, adapter.delta_weight(base))
        torch.testing.assert_close(merged, reference_weight(adapter, W), atol=1e-5, rtol=1e-5)
        rank = torch.linalg.matrix_rank(L.to_base_layout(base, adapter.delta_weight(base)))
        assert rank == (6 if mode == "additive" else 3)  # the additive variant doubles LoRA's rank capacity
        x = torch.randint(0, 50, (2, 5)) if isinstance(base, nn.Embedding) else torch.randn(2, 5, 16)
        layer = copy.deepcopy(base)
        with torch.no_grad():
            layer.weight.add_(adapter.delta_weight(base))
            torch.testing.assert_close(adapter(x, base, base(x)), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("mode", ["additive", "rotation"])
def test_training_keeps_rotations_orthonormal_and_merge_exact(make, mode):
    model = make()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("spectral", r=4, mode=mode), targets="all-linear")
    assert torch.equal(logits(model, X), y0)
    layers = [(w.base_layer, w.adapters["default"]) for _, w in wrappers(model)]
    per_layer = [4 * sum(L.dims(b)) if mode == "additive" else 2 * 4 * 4 for b, _ in layers]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(per_layer)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(X, labels=X).loss.backward()
        opt.step()
    model.eval()
    y = logits(model, X)
    assert (y - y0).abs().max() > 1e-3
    if mode == "rotation":
        for _, a in layers:
            R_U, R_V = a.rotations()
            assert a.P_U.abs().max() > 1e-3  # it did train
            eye = torch.eye(4)
            torch.testing.assert_close((a.U @ R_U).T @ (a.U @ R_U), eye, atol=1e-5, rtol=0)
            torch.testing.assert_close((a.Vh.T @ R_V).T @ (a.Vh.T @ R_V), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)


def test_rotation_adapter_round_trips_through_a_dir(tmp_path):
    model = tiny_gpt2()
    lk.attach(model, lk.method_config("spectral", mode="rotation"), targets=["c_attn", "c_fc", "wte"])
    randomize_adapters(model, std=0.5)
    lk.save_adapter(model, tmp_path / "a")
    loaded = lk.load_adapter(tiny_gpt2(), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, X), logits(model, X), atol=1e-6, rtol=0)
    assert next(w for _, w in wrappers(loaded)).adapters["default"].config.mode == "rotation"


def test_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="mode must be one of"):
        lk.method_config("spectral", mode="rotate")
    with pytest.raises(lk.ConfigError, match=r"spectral r=40 exceeds the rank a layer with d_in=64, d_out=32"):
        lk.attach(tiny_llama(), lk.method_config("spectral", r=40), targets=["k_proj"])
