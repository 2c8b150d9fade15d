"""lk.quantize / lk.dequantize / lk.load_base(quantize=): which layers, in place, errors, no bitsandbytes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.quant import QUANTS, quantized_kinds
from lorakit.testing import tiny_gpt2, tiny_llama
from tests.conftest import save_tiny_checkpoint
from tests.helpers import logits, tokens

pytest.importorskip("bitsandbytes")

KINDS = {"nf4": ("bnb4bit", 0.15), "fp4": ("bnb4bit", 0.2), "int8": ("bnb8bit", 0.02)}  # kind -> layer kind, drift


def test_the_bitsandbytes_kinds_are_registered():
    assert {"nf4", "fp4", "int8"} <= set(QUANTS)
    assert {QUANTS[k].bits for k in ("nf4", "fp4")} == {4} and QUANTS["int8"].bits == 8


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_quantize_replaces_every_linear_but_the_head_in_place(kind):
    model = tiny_llama()
    x = tokens()
    y = logits(model, x)
    head = model.lm_head
    assert lk.quantize(model, kind) is model
    layer_kind, drift = KINDS[kind]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert len(linears) == 14 and all(L.kind_of(model.get_submodule(n)).name == layer_kind for n in linears)
    assert model.lm_head is head and type(head) is nn.Linear
    assert quantized_kinds(model) == {layer_kind}
    assert getattr(model, "is_loaded_in_4bit" if kind != "int8" else "is_loaded_in_8bit") is True
    y_q = logits(model, x)
    assert 0 < float((y_q - y).abs().max()) < drift * float(y.abs().max())
    q = model.model.layers[0].mlp.up_proj
    assert L.layer_kind(q) == "linear" and L.is_quantized(q) and L.dims(q) == (64, 128)
    xs = torch.randn(3, 64)
    torch.testing.assert_close(L.base_linear(q, xs), nn.functional.linear(xs, L.weight_out_in(q)), atol=0.02, rtol=0)


def test_dequantize_gives_plain_linears_with_the_same_outputs():
    model = lk.quantize(tiny_llama(), "nf4")
    x = tokens()
    y = logits(model, x)
    assert lk.dequantize(model) is model
    assert quantized_kinds(model) == set() and not hasattr(model, "is_loaded_in_4bit")
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    torch.testing.assert_close(logits(model, x), y, atol=1e-5, rtol=1e-5)


def test_skip_keeps_named_layers():
    model = lk.quantize(tiny_llama(), "nf4", skip=["lm_head", "down_proj"])
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert L.is_quantized(model.model.layers[0].mlp.up_proj)


def test_unknown_kind_is_a_did_you_mean_error():
    with pytest.raises(lk.ConfigError, match=r"unknown quantization kind 'nf5'\. Did you mean 'nf4'"):
        lk.quantize(tiny_llama(), "nf5")


def test_bad_input_is_a_clear_error():
    with pytest.raises(lk.ConfigError, match=r"skip must be a list .* use \['lm_head'\]"):
        lk.quantize(tiny_llama(), "nf4", skip="lm_head")
    with pytest.raises(lk.TargetError, match="found no nn.Linear layer in GPT2LMHeadModel"):
        lk.quantize(tiny_gpt2(), "nf4")  # Conv1D layers only (its head is skipped)
    adapted = lk.attach(tiny_llama(), lk.method_config("lora", r=2))
    with pytest.raises(lk.ConfigError, match="needs a model without adapters"):
        lk.quantize(adapted, "nf4")


def test_load_base_quantizes_after_loading(tmp_path):
    save_tiny_checkpoint(tmp_path)
    model, tok = lk.load_base(str(tmp_path), quantize="nf4")
    assert quantized_kinds(model) == {"bnb4bit"} and type(model.lm_head) is nn.Linear
    with pytest.raises(lk.ConfigError, match="Did you mean 'int8'"):
        lk.load_base(str(tmp_path), quantize="int9")


def test_lorakit_works_without_bitsandbytes_and_says_how_to_get_it():
    code = (
        "import sys, torch, lorakit as lk, lorakit.layers, lorakit.methods, lorakit.quant\n"
        "print('imported:', 'bitsandbytes' in sys.modules)\n"  # installed, yet importing lorakit does not load it
        "sys.modules['bitsandbytes'] = None\n"  # from here on, import bitsandbytes -> ImportError
        "from lorakit.testing import tiny_llama\n"
        "m = lk.attach(tiny_llama(), lk.method_config('lora', r=2))\n"
        "m(torch.zeros(1, 4, dtype=torch.long))\n"
        "try:\n"
        "    lk.quantize(tiny_llama(), 'nf4')\n"
        "except lk.ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "imported: False" in out and "pip install 'lorakit[quant]'" in out


def test_an_nf4_adapter_loads_onto_the_full_precision_base_with_a_note(tmp_path):
    model = lk.attach(lk.quantize(tiny_llama(), "nf4"), lk.method_config("lora", r=2))
    lk.save_adapter(model, tmp_path / "a")
    with pytest.warns(UserWarning, match=r"^note: .* trained on a quantized base \(bnb4bit\); it loads onto this"):
        loaded = lk.load_adapter(tiny_llama(), tmp_path / "a")
    assert lk.adapter_names(loaded) == ["default"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.load_adapter(lk.quantize(tiny_llama(), "nf4"), tmp_path / "a")  # onto a quantized base: no note


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_lora_trains_on_every_kind(kind):
    model = lk.attach(lk.quantize(tiny_llama(), kind), lk.method_config("lora", r=2, alpha=4))
    x = tokens()
    model.train()
    model(x, labels=x).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert len(grads) == 28 and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
