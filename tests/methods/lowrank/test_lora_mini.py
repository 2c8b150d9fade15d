"""LoRA-Mini: A = A_in·A_out, B = B_out·B_in with the outer factors frozen and only the inner ones trained
(r·(a+b) per layer); ΔW = s·B·A exactly; merged = unmerged; the outer factors come back from the seed, not the file."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.lowrank.lora_mini import LoraMini
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()


def _bases():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # (out=24, in=16)
    nn.init.normal_(conv.weight)
    return [nn.Linear(16, 24), conv, nn.Embedding(50, 24)]


def test_update_is_the_product_of_outer_and_inner_factors():
    for base in _bases():
        adapter = LoraMini.from_base(base, lk.method_config("lora_mini", r=3, a=10, b=7, alpha=6.0))
        randomize_adapters(adapter, std=0.3)
        A = adapter.A_in @ adapter.A_out  # (r, in): A = A_in·A_out
        B = adapter.B_out @ adapter.B_in  # (out, r): B = B_out·B_in
        assert adapter.A_out.shape == (10, L.dims(base)[0]) and adapter.B_out.shape == (L.dims(base)[1], 7)
        delta = (6.0 / 3) * B @ A  # (out, in)
        torch.testing.assert_close(L.to_base_layout(base, delta), adapter.delta_weight(base))
        x = torch.randint(0, 50, (2, 5)) if isinstance(base, nn.Embedding) else torch.randn(2, 5, 16)
        merged = copy.deepcopy(base)  # the base layer with W + ΔW in its own layout
        with torch.no_grad():
            merged.weight.add_(adapter.delta_weight(base))
            torch.testing.assert_close(adapter(x, base, base(x)), merged(x), atol=1e-5, rtol=1e-5)
        f = adapter.to_lora(base)
        torch.testing.assert_close(f.scale * f.B @ f.A, delta, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_only_the_inner_factors_train_and_the_outer_ones_stay_frozen(make):
    model = make()
    y0 = logits(model, X)
    targets = "all-linear" if make is tiny_llama else ["c_attn", "c_fc", "c_proj", "wte"]
    lk.attach(model, lk.method_config("lora_mini", r=4, a=16, b=12), targets=targets)
    torch.testing.assert_close(logits(model, X), y0, atol=1e-6, rtol=0)  # B_in = 0: the base model
    layers = [w.adapters["default"] for _, w in wrappers(model)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == len(layers) * 4 * (16 + 12)  # the paper's r·(a + b) per layer
    outer = [(a.A_out.clone(), a.B_out.clone()) for a in layers]
    inner = [(a.A_in.detach().clone(), a.B_in.detach().clone()) for a in layers]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(X, labels=X).loss.backward()
        opt.step()
    for a, (A_out, B_out), (A_in, B_in) in zip(layers, outer, inner, strict=True):
        assert torch.equal(a.A_out, A_out) and torch.equal(a.B_out, B_out)
        assert not torch.equal(a.A_in.detach(), A_in) and not torch.equal(a.B_in.detach(), B_in)
    model.eval()
    torch.testing.assert_close(logits(lk.merge(model), X), logits(model, X), atol=1e-5, rtol=1e-5)


def test_saved_file_holds_only_the_inner_factors_and_the_seed_rebuilds_the_outer_ones(tmp_path):
    model = tiny_llama()
    lk.attach(model, lk.method_config("lora_mini", seed=7), targets=["q_proj", "down_proj"])
    randomize_adapters(model, seed=3, std=0.2)
    lk.save_adapter(model, tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"lora_mini_A_in", "lora_mini_B_in"}
    loaded = lk.load_adapter(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, X), logits(model, X), atol=1e-6, rtol=0)
    other = LoraMini.from_base(nn.Linear(64, 64), lk.method_config("lora_mini", seed=8))
    same = LoraMini.from_base(nn.Linear(64, 64), lk.method_config("lora_mini", seed=7))
    assert torch.equal(same.A_out, dict(wrappers(loaded))["model.layers.0.self_attn.q_proj"].adapters["default"].A_out)
    assert not torch.equal(other.A_out, same.A_out)


def test_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="a must be a positive integer"):
        lk.method_config("lora_mini", a=0)
    with pytest.raises(lk.ConfigError, match="seed must be an integer"):
        lk.method_config("lora_mini", seed=1.5)
    with pytest.raises(lk.ConfigError, match="alpha must be > 0"):
        lk.method_config("lora_mini", alpha=0)
