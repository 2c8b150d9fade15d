"""LoftQ as an init option: Q + s·B·A closer to W than Q(W), PEFT's factors at 4 bits, saved dirs PEFT and
lorakit load onto the original base (rebuilding Q), 2 bits through the reference quantizer, quantized bases."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit import layers as L
from lorakit.init.loftq import loftq
from lorakit.inject import wrappers
from lorakit.quant._reference import fake_quantize
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import logits, tokens

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def loftq_model(bits: int = 4, iterations: int = 1, r: int = 4, alpha: float = 4.0, seed: int = 0):
    original = tiny_llama(seed)
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules() if n.split(".")[-1] in TARGETS}
    cfg = lk.method_config(
        "lora", r=r, alpha=alpha, init="loftq", init_options={"bits": bits, "iterations": iterations}
    )
    return lk.attach(original, cfg, targets=TARGETS), weights


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("iterations", [1, 3])
def test_every_layer_is_closer_to_w_than_plain_quantization(bits, iterations):
    model, weights = loftq_model(bits, iterations, alpha=8.0)  # s = 2: the factors carry the scale
    for name, wrapper in wrappers(model):
        W, Q = weights[name], L.weight_out_in(wrapper.base_layer)
        a = wrapper.adapters["default"]
        assert torch.equal(fake_quantize(Q, bits), Q)  # the base is on the grid
        err_loftq = float((W - Q - a.scale * a.B @ a.A).norm())
        err_quant = float((W - fake_quantize(W, bits)).norm())
        assert err_loftq < err_quant, (name, err_loftq, err_quant)


@pytest.mark.parametrize("iterations", [1, 2])
def test_four_bits_gives_peft_s_loftq_factors(iterations):
    """PEFT's loftq_init on the same weight (bitsandbytes NF4): the same Q bit for bit; A and B asserted to 1e-5
    (measured: bit-identical here, the same SVD calls in the same order)."""
    from peft.utils.loftq_utils import loftq_init

    W = tiny_llama().model.layers[0].mlp.up_proj.weight.detach()  # (128, 64)
    Q, Lf, Rf = loftq(W, 4, bits=4, iterations=iterations)
    Q_peft, A_peft, B_peft = loftq_init(W, num_bits=4, reduced_rank=4, num_iter=iterations)
    assert torch.equal(Q, Q_peft)
    torch.testing.assert_close(Rf, A_peft, atol=1e-5, rtol=0)
    torch.testing.assert_close(Lf, B_peft, atol=1e-5, rtol=0)


def test_peft_and_lorakit_load_the_saved_dir_onto_the_original_base(tmp_path):
    model, _ = loftq_model(bits=4, iterations=2)
    randomize_adapters(model, std=0.05)
    x = tokens()
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    fields = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert fields["init_lora_weights"] == "loftq"
    assert fields["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(lk.load_adapter(tiny_llama(), tmp_path / "a"), x), y, atol=1e-5, rtol=0)


def test_a_peft_loftq_dir_loads_in_lorakit(tmp_path):
    loftq_config = peft.LoftQConfig(loftq_bits=4, loftq_iter=1)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq", loftq_config=loftq_config
    )
    theirs = peft.get_peft_model(tiny_llama(), cfg).eval()
    theirs.save_pretrained(tmp_path / "p")
    x = tokens()
    torch.testing.assert_close(
        logits(lk.load_adapter(tiny_llama(), tmp_path / "p"), x), logits(theirs, x), atol=1e-5, rtol=0
    )


def test_two_bits_round_trips_through_lorakit(tmp_path):
    model, _ = loftq_model(bits=2, iterations=2)
    randomize_adapters(model, std=0.05)
    x = tokens()
    lk.save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(
        logits(lk.load_adapter(tiny_llama(), tmp_path / "a"), x), logits(model, x), atol=1e-5, rtol=0
    )


def test_a_4_bit_loftq_dir_loads_onto_the_nf4_quantized_original(tmp_path):
    """At 4 bits and one iteration Q = NF4(W): the dir applies as it is to lk.quantize(original, "nf4")."""
    pytest.importorskip("bitsandbytes")
    model, _ = loftq_model(bits=4, iterations=1)
    randomize_adapters(model, std=0.05)
    lk.save_adapter(model, tmp_path / "a")
    x = tokens()
    on_nf4 = lk.load_adapter(lk.quantize(tiny_llama(), "nf4"), tmp_path / "a")
    torch.testing.assert_close(logits(on_nf4, x), logits(model, x), atol=1e-5, rtol=0)


def test_quantizing_after_loftq_holds_q_exactly():
    pytest.importorskip("bitsandbytes")
    model, _ = loftq_model(bits=4)
    before = {n: L.weight_out_in(w.base_layer).clone() for n, w in wrappers(model)}
    lk.delete_adapter(model, "default")  # quantize a plain model, then attach the adapter again (or load it)
    lk.quantize(model, "nf4")
    for name, W in before.items():
        assert torch.equal(L.weight_out_in(model.get_submodule(name)), W), name


def test_bad_input_is_a_clear_error():
    with pytest.raises(lk.ConfigError, match="loftq: bits must be 2, 3 or 4"):
        lk.method_config("lora", init="loftq", init_options={"bits": 8})
    with pytest.raises(lk.ConfigError, match="iterations must be an integer >= 1"):
        lk.method_config("lora", init="loftq", init_options={"iterations": 0})
    with pytest.raises(lk.ConfigError, match="init 'loftq' does not apply to method 'dora'"):
        lk.attach(tiny_llama(), lk.method_config("dora", init="loftq"), targets=TARGETS)
    pytest.importorskip("bitsandbytes")
    quantized = lk.quantize(tiny_llama(), "nf4")
    with pytest.raises(
        lk.TargetError, match="holds it quantized. Do it on the full-precision model and quantize after"
    ):
        lk.attach(quantized, lk.method_config("lora", init="loftq"), targets=TARGETS)
    assert lk.adapter_names(quantized) == []
