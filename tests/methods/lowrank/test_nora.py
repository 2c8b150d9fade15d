"""NoRA: the frozen outer LoRA is the rank-R SVD of W, the inner rank-r LoRA trains (2·r·R per layer), the model
starts as the base, ΔW = s·B_o·B_i·A_i·A_o, and merged = unmerged."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.lowrank.nora import Nora
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()


def _bases():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # (out=24, in=16)
    nn.init.normal_(conv.weight)
    return [nn.Linear(16, 24), conv, nn.Embedding(50, 24)]


def test_outer_lora_is_the_truncated_svd_of_w_split_evenly():
    for base in _bases():
        adapter = Nora.from_base(base, lk.method_config("nora", r=2, outer_r=6))
        W = L.weight_out_in(base).detach()  # (out, in)
        s = torch.linalg.svdvals(W)
        # B_o·A_o is the best rank-6 approximation of W (Eckart–Young) ...
        err = (W - adapter.B_o @ adapter.A_o).norm()
        torch.testing.assert_close(err, s[6:].square().sum().sqrt(), atol=1e-5, rtol=1e-5)
        # ... split as U·√Σ and √Σ·Vᵀ: both factors have column / row norms √σ_i
        torch.testing.assert_close(adapter.B_o.norm(dim=0), s[:6].sqrt(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter.A_o.norm(dim=1), s[:6].sqrt(), atol=1e-5, rtol=1e-5)
        assert adapter.A_i.shape == (2, 6) and adapter.B_i.shape == (6, 2)


def test_update_is_the_nested_product_and_merge_is_exact():
    for base in _bases():
        adapter = Nora.from_base(base, lk.method_config("nora", r=2, outer_r=6, alpha=3.0))
        randomize_adapters(adapter, std=0.3)
        delta = 1.5 * adapter.B_o @ adapter.B_i @ adapter.A_i @ adapter.A_o  # s·B_o·(B_i·A_i)·A_o, (out, in)
        torch.testing.assert_close(adapter.delta_weight(base), L.to_base_layout(base, delta))
        assert torch.linalg.matrix_rank(delta) == 2
        x = torch.randint(0, 50, (2, 5)) if isinstance(base, nn.Embedding) else torch.randn(2, 5, 16)
        merged = copy.deepcopy(base)
        with torch.no_grad():
            merged.weight.add_(adapter.delta_weight(base))
            torch.testing.assert_close(adapter(x, base, base(x)), merged(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_starts_as_the_base_trains_2_r_r_prime_parameters_and_merges_exactly(make):
    model = make()
    y0 = logits(model, X)
    targets = "all-linear" if make is tiny_llama else ["c_attn", "c_fc", "c_proj", "wte"]
    lk.attach(model, lk.method_config("nora", r=4, outer_r=16), targets=targets)
    assert torch.equal(logits(model, X), y0)  # B_i = 0: exactly the base
    layers = [w.adapters["default"] for _, w in wrappers(model)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == len(layers) * 2 * 4 * 16  # the paper's 2·r·r' per layer
    outer = [(a.A_o.clone(), a.B_o.clone()) for a in layers]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(X, labels=X).loss.backward()
        opt.step()
    model.eval()
    assert all(torch.equal(a.A_o, A) and torch.equal(a.B_o, B) for a, (A, B) in zip(layers, outer, strict=True))
    y = logits(model, X)
    assert (y - y0).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)


def test_only_the_inner_factors_are_saved(tmp_path):
    model = tiny_llama()
    lk.attach(model, lk.method_config("nora"), targets=["q_proj", "v_proj"])
    randomize_adapters(model, std=0.2)
    lk.save_adapter(model, tmp_path / "a")
    shapes = {
        k.rsplit(".", 1)[-1]: tuple(t.shape) for k, t in load_file(tmp_path / "a" / "adapter_model.safetensors").items()
    }
    assert shapes == {"nora_A": (8, 32), "nora_B": (32, 8)}
    loaded = lk.load_adapter(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, X), logits(model, X), atol=1e-6, rtol=0)


def test_bad_ranks_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="outer_r must be an integer >= r=8"):
        lk.method_config("nora", outer_r=4)
    with pytest.raises(lk.ConfigError, match=r"outer_r=48 exceeds the rank a layer with d_in=64, d_out=32"):
        lk.attach(tiny_llama(), lk.method_config("nora", outer_r=48), targets=["k_proj"])
