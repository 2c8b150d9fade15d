"""LoRA-XS: frozen SVD factors of W, only the r×r R trains (r² per layer), R = 0 is the base, merged = unmerged."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.lowrank.lora_xs import LoraXS
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens


def _bases():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # (out=24, in=16)
    nn.init.normal_(conv.weight)
    return [nn.Linear(16, 24), conv, nn.Embedding(50, 24)]


def test_frozen_factors_are_the_best_rank_r_approximation_of_w():
    """U_r·Σ_r V_rᵀ is W's truncated SVD: orthonormal U, and ‖W − U·SV‖ = √(Σ_{i>r} σ_i²) (Eckart–Young)."""
    for base in _bases():
        adapter = LoraXS.from_base(base, lk.method_config("lora_xs", r=4))
        W = L.weight_out_in(base).detach()
        s = torch.linalg.svdvals(W)
        torch.testing.assert_close(adapter.U.T @ adapter.U, torch.eye(4), atol=1e-5, rtol=0)
        err = (W - adapter.U @ adapter.SV).norm()
        torch.testing.assert_close(err, s[4:].square().sum().sqrt(), atol=1e-5, rtol=1e-5)
        # the singular values sit on the input side: the rows of SV have norms σ_1..σ_r
        torch.testing.assert_close(adapter.SV.norm(dim=1), s[:4], atol=1e-5, rtol=1e-5)
        # fixed signs: each u_i's largest-magnitude entry is positive, so the factors are reproducible
        peak = adapter.U.abs().argmax(dim=0)
        assert (adapter.U[peak, torch.arange(4)] > 0).all()


def test_only_r_squared_parameters_train_and_factors_stay_frozen():
    model = tiny_llama()
    lk.attach(model, lk.method_config("lora_xs", r=4), targets="all-linear")
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = list(wrappers(model))
    assert len(layers) == 14 and sum(p.numel() for p in trainable) == 14 * 4 * 4
    frozen = {n: (w.adapters["default"].U.clone(), w.adapters["default"].SV.clone()) for n, w in layers}
    R0 = {n: w.adapters["default"].R.detach().clone() for n, w in layers}
    x = tokens()
    opt = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    model(x, labels=x).loss.backward()
    opt.step()
    for n, w in layers:
        a = w.adapters["default"]
        assert torch.equal(a.U, frozen[n][0]) and torch.equal(a.SV, frozen[n][1])
        assert not torch.equal(a.R.detach(), R0[n])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_r_zero_gives_the_base_output_and_merge_equals_forward(make):
    model, x = make(), tokens()
    y0 = logits(model, x)
    lk.attach(model, lk.method_config("lora_xs", r=4, init_std=0.0), targets="all-linear")
    torch.testing.assert_close(logits(model, x), y0, atol=0, rtol=0)
    randomize_adapters(model, std=0.2)
    y = logits(model, x)
    assert (y - y0).abs().max() > 1e-2
    torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=1e-5)


def test_default_init_is_within_noise_of_the_base():
    model, x = tiny_llama(), tokens()
    y0 = logits(model, x)
    lk.attach(model, lk.method_config("lora_xs"), targets="all-linear")
    assert 0 < (logits(model, x) - y0).abs().max() < 1e-3


def test_update_equals_the_authors_formulation():
    """Their layer: lora_B(R(lora_A(x)))·s with (lora_A, lora_B) from the SVD of Wᵀ — computed here independently."""
    base = nn.Linear(16, 24)
    adapter = LoraXS.from_base(base, lk.method_config("lora_xs", r=4, alpha=8.0))
    randomize_adapters(adapter, std=0.3)
    u, s, vh = torch.linalg.svd(base.weight.detach().T, full_matrices=False)  # Wᵀ (in, out) as their code
    enc, dec = (u @ torch.diag(s))[:, :4], vh[:4]  # (in, r), (r, out)
    signs = torch.sign((adapter.U * dec.T).sum(0))  # SVD signs are arbitrary: align theirs to ours
    lora_A, lora_B = (enc * signs).T, (dec.T * signs)  # (r, in), (out, r)
    x = torch.randn(5, 16)
    with torch.no_grad():
        theirs = base(x) + (x @ lora_A.T @ adapter.R.T @ lora_B.T) * 2.0  # s = alpha/r = 8/4
        torch.testing.assert_close(adapter(x, base, base(x)), theirs, atol=1e-5, rtol=1e-5)


def test_save_stores_only_r_and_reload_recomputes_the_factors(tmp_path):
    model, x = tiny_gpt2(), tokens()
    lk.attach(model, lk.method_config("lora_xs", r=4), targets=["c_attn", "c_fc", "wte"])
    randomize_adapters(model, std=0.2)
    lk.save_adapter(model, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert saved and all(k.endswith(".lora_xs_R") and v.shape == (4, 4) for k, v in saved.items())
    loaded = lk.load_adapter(tiny_gpt2(), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=0)


def test_rank_above_the_layer_rank_is_a_clear_error():
    with pytest.raises(lk.ConfigError, match=r"lora_xs r=65 .*d_in=64, d_out=64"):
        lk.attach(tiny_llama(), lk.method_config("lora_xs", r=65), targets=["q_proj"])
    with pytest.raises(lk.ConfigError, match="r must be a positive integer"):
        lk.method_config("lora_xs", r=0)
