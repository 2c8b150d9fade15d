"""VeRA: one shared frozen random (A, B) from the seed, only b and d train (r + d_out per layer), PEFT parity."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.shared.vera import Vera
from lorakit.testing import randomize_adapters
from tests.helpers import MODELS, logits, tokens

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TARGETS = {"llama": ["q_proj", "k_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
X = tokens()


def ours(kind: str, r: int = 8, seed: int = 0):
    model = MODELS[kind][0](0)
    lk.attach(model, lk.method_config("vera", r=r, projection_prng_key=seed), targets=TARGETS[kind])
    randomize_adapters(model, seed=1, std=0.2)
    return model


def peft_model(kind: str, r: int = 8, seed: int = 0, save_projection: bool = False):
    config = peft.VeraConfig(
        r=r,
        target_modules=TARGETS[kind],
        projection_prng_key=seed,
        save_projection=save_projection,
        fan_in_fan_out=kind == "gpt2",
    )
    return peft.get_peft_model(MODELS[kind][0](0), config).eval()


def copy_lambdas(src, dst_peft) -> None:
    """Our (b, d) vectors into PEFT's layers of the same names."""
    with torch.no_grad():
        for name, wrapper in wrappers(src):
            layer = dst_peft.base_model.model.get_submodule(name)
            adapter = wrapper.adapters["default"]
            layer.vera_lambda_b["default"].copy_(adapter.vera_lambda_b)
            layer.vera_lambda_d["default"].copy_(adapter.vera_lambda_d)


@pytest.mark.parametrize("kind", MODELS)
def test_one_shared_projection_generated_as_peft_does(kind):
    model = ours(kind, r=8, seed=7)
    logits(model, X)  # first use generates the projection
    adapters = [w.adapters["default"] for _, w in wrappers(model)]
    shared = {id(a.shared) for a in adapters}
    assert len(shared) == 1, "every layer of one attach uses the same (A, B) tensors"
    A, B = adapters[0].shared.vera_A, adapters[0].shared.vera_B
    max_in = max(a.d_in for a in adapters)
    max_out = max(a.d_out for a in adapters)
    assert A.shape == (8, max_in) and B.shape == (max_out, 8)
    theirs = peft_model(kind, r=8, seed=7).base_model
    assert torch.equal(A, theirs.vera_A["default"]) and torch.equal(B, theirs.vera_B["default"])
    model.to(torch.bfloat16)  # still one tensor pair after a dtype move
    assert len({a.shared.vera_A.data_ptr() for a in adapters}) == 1 and A.dtype == torch.float32
    assert adapters[0].shared.vera_A.dtype == torch.bfloat16


def test_first_use_under_inference_mode_still_trains():
    model = MODELS["llama"][0](0)
    lk.attach(model, lk.method_config("vera", r=8), targets="all-linear")
    with torch.inference_mode():
        model(X)  # generates the shared projection: it must be a normal tensor, usable by autograd later
    model.train()
    model(X, labels=X).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_only_b_and_d_train_r_plus_d_out_per_layer():
    model = MODELS["llama"][0](0)
    lk.attach(model, lk.method_config("vera", r=16), targets="all-linear")
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"vera_lambda_b", "vera_lambda_d"}
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(16 + L.dims(w.base_layer)[1] for _, w in wrappers(model))
    assert not any(b.requires_grad for b in model.buffers())


@pytest.mark.parametrize("kind", MODELS)
def test_same_weights_in_peft_give_the_same_outputs(kind):
    model = ours(kind)
    theirs = peft_model(kind)
    copy_lambdas(model, theirs)
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), X), logits(lk.merge(model), X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_lorakit_dir_loads_in_peft(kind, tmp_path):
    model = ours(kind)
    lk.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is False
    theirs = peft.PeftModel.from_pretrained(MODELS[kind][0](0), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_peft_dir_loads_in_lorakit(kind, tmp_path):
    theirs = peft_model(kind, seed=3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "vera_lambda" in name:
                p.add_(torch.randn(p.shape) * 0.2)
    theirs.save_pretrained(tmp_path / "p")
    loaded = lk.load_adapter(MODELS[kind][0](0), tmp_path / "p")
    torch.testing.assert_close(logits(loaded, X), logits(theirs, X), atol=1e-5, rtol=1e-5)


def test_peft_dir_with_a_stored_projection_is_a_clear_error(tmp_path):
    peft_model("llama", save_projection=True).save_pretrained(tmp_path / "p")
    with pytest.raises(lk.AdapterFormatError, match="save_projection"):
        lk.load_adapter(MODELS["llama"][0](0), tmp_path / "p")


def test_a_generated_projection_is_never_resized_by_later_layers():
    """Reusing one config object for a second attach must not change the first adapter's (already used) outputs."""
    model = MODELS["llama"][0](0)
    cfg = lk.method_config("vera", r=8)
    lk.attach(model, cfg, targets=["q_proj"], name="a")  # largest layer 64×64
    randomize_adapters(model, seed=1, std=0.2)
    ya = logits(model, X)
    lk.attach(model, cfg, targets=["down_proj"], name="b")  # 128 inputs: would grow a shared A
    lk.set_active(model, "a")
    assert torch.equal(logits(model, X), ya)
    (_, wrapper) = next(wrappers(model))
    assert wrapper.adapters["a"].shared.vera_A.shape == (8, 64)


def test_embeddings_are_refused_and_bad_options_are_clear_errors():
    with pytest.raises(lk.TargetError, match="vera"):
        lk.attach(MODELS["llama"][0](0), lk.method_config("vera"), targets=["embed_tokens"])
    with pytest.raises(lk.ConfigError, match="r must be a positive integer"):
        lk.method_config("vera", r=0)
    assert Vera.config_from_peft({"peft_type": "LORA"}) is None
