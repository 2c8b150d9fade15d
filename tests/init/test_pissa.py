"""PiSSA (``init="pissa"``; on DoRA: tests/init/test_options.py): A, B from the top-r SVD of W; residual
base + adapter reproduces the original outputs; matches PEFT's
init_lora_weights="pissa" (and "pissa_niter_N"); saved as a rank-2r plain LoRA for the original base."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

peft = pytest.importorskip("peft")
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def initialised(base: nn.Linear, cfg: object) -> nn.Module:
    """The adapter ``cfg``'s init gives a copy of ``base`` (attached alone, so ``base`` itself is untouched)."""
    model = nn.Sequential(copy.deepcopy(base))
    lk.attach(model, cfg, targets=["0"])
    return model[0].adapters["default"]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_adapter_is_the_principal_part_and_outputs_are_unchanged(make):
    original, model = make(), make()
    x = tokens()
    lk.attach(model, lk.method_config("lora", r=4, alpha=16, init="pissa"))  # scale s = 4 must be divided out of A, B
    torch.testing.assert_close(logits(model, x), logits(original, x), atol=1e-5, rtol=0)
    originals = dict(original.named_modules())
    for name, wrapper in wrappers(model):
        adapter = wrapper.adapters["default"]
        W = L.weight_out_in(originals[name]).detach().double()  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        principal = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        torch.testing.assert_close((adapter.scale * adapter.B @ adapter.A).double(), principal, atol=1e-5, rtol=0)
        residual = L.weight_out_in(wrapper.base_layer).double()
        torch.testing.assert_close(residual, W - principal, atol=1e-5, rtol=0)
        # the residual keeps exactly W's tail spectrum
        torch.testing.assert_close(torch.linalg.svdvals(residual)[: S.numel() - 4], S[4:], atol=1e-5, rtol=0)
        n_trainable = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
        d_in, d_out = L.dims(wrapper.base_layer)
        assert n_trainable == 4 * (d_in + d_out)


def test_factors_and_outputs_match_peft_pissa():
    ours, base = tiny_llama(), tiny_llama()
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="pissa")
    )
    lk.attach(ours, lk.method_config("lora", r=4, alpha=8, init="pissa"), targets=LLAMA)
    peft_layers = dict(theirs.base_model.model.named_modules())
    for name, wrapper in wrappers(ours):
        adapter, layer = wrapper.adapters["default"], peft_layers[name]
        torch.testing.assert_close(adapter.A, layer.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter.B, layer.lora_B["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(wrapper.base_layer.weight, layer.base_layer.weight, atol=1e-6, rtol=0)
    randomize_adapters(ours, std=0.1)  # the same trained weights in both
    state = {
        f"base_model.model.{name}.{key}": t.detach()
        for name, wrapper in wrappers(ours)
        for key, t in wrapper.adapters["default"].export_state().items()
    }
    assert not peft.set_peft_model_state_dict(theirs, state).unexpected_keys
    x = tokens()
    assert (logits(ours, x) - logits(base, x)).abs().max() > 1e-3
    torch.testing.assert_close(logits(theirs.eval(), x), logits(ours, x), atol=1e-5, rtol=1e-5)


def test_randomized_svd_matches_peft_pissa_niter():
    """niter=N is torch.svd_lowrank(W, r, N), PEFT's "pissa_niter_N": same seed, same factors."""
    base = nn.Linear(48, 40)
    theirs = peft.get_peft_model(
        nn.Sequential(nn.Linear(48, 40)), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"])
    )
    layer = theirs.base_model.model[0]
    layer.base_layer.weight.data.copy_(base.weight.data)
    torch.manual_seed(3)
    adapter = initialised(base, lk.method_config("lora", r=4, init="pissa", init_options={"niter": 2}))
    torch.manual_seed(3)
    layer.pissa_init("default", "pissa_niter_2")
    torch.testing.assert_close(adapter.A, layer.lora_A["default"].weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter.B, layer.lora_B["default"].weight, atol=1e-5, rtol=0)
    exact = initialised(base, lk.method_config("lora", r=4, init="pissa"))
    assert not torch.allclose(adapter.A.abs(), exact.A.abs(), atol=1e-3)  # a sketch, not the exact SVD


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_saved_adapter_is_rank_2r_lora_on_the_original_base(make, tmp_path):
    model, x = make(), tokens()
    lk.attach(model, lk.method_config("lora", r=4, init="pissa"))
    randomize_adapters(model, std=0.1)  # "trained"
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    fields = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert fields["peft_type"] == "LORA" and fields["r"] == 8 and fields["init_lora_weights"] is True
    torch.testing.assert_close(logits(lk.load_adapter(make(), tmp_path / "a"), x), y, atol=1e-5, rtol=0)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "a").eval()  # PEFT reads it the same way
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=0)
    with pytest.raises(lk.AdapterFormatError, match="different base model"):
        lk.load_adapter(make(seed=1), tmp_path / "a")


def test_peft_converted_pissa_dir_loads_with_the_same_outputs(tmp_path):
    """PEFT's own conversion (path_initial_model_for_weight_conversion) of the same weights loads in lorakit."""
    ours = tiny_llama()
    lk.attach(ours, lk.method_config("lora", r=4, init="pissa"), targets=LLAMA)
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="pissa")
    )
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial factors first
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    randomize_adapters(ours, std=0.1)
    state = {
        f"base_model.model.{name}.{key}": t.detach()
        for name, wrapper in wrappers(ours)
        for key, t in wrapper.adapters["default"].export_state().items()
    }
    peft.set_peft_model_state_dict(theirs, state)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "init")
    lk.save_adapter(ours, tmp_path / "ours")
    x = tokens()
    y = logits(ours, x)
    for folder in ("converted", "ours"):
        loaded = lk.load_adapter(tiny_llama(), tmp_path / folder, check_base=folder == "ours")
        torch.testing.assert_close(logits(loaded, x), y, atol=1e-5, rtol=0)


def test_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="r=80 exceeds min"):
        lk.attach(tiny_llama(), lk.method_config("lora", r=80, init="pissa"))
    with pytest.raises(lk.ConfigError, match="niter"):
        lk.method_config("lora", init="pissa", init_options={"niter": -1})
    with pytest.raises(lk.ConfigError, match="does not combine with train_only"):
        lk.method_config("lora", init="pissa", train_only="B")
    with pytest.raises(lk.TargetError, match="cannot wrap model.embed_tokens"):
        lk.attach(tiny_llama(), lk.method_config("lora", init="pissa"), targets=["embed_tokens"])
