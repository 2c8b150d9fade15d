"""FourierFT: n coefficients at fixed random spectral entries, ΔW = α·Re(IDFT2(S)), outputs match PEFT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.fourierft import FourierFT
from lorakit.testing import randomize_adapters
from tests.helpers import MODELS, logits, tokens

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TARGETS = {"llama": ["q_proj", "k_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
X = tokens()


def ours(kind: str, n: int = 200):
    model = MODELS[kind][0](0)
    lk.attach(model, lk.method_config("fourierft", n_frequency=n, scaling=20.0), targets=TARGETS[kind])
    randomize_adapters(model, seed=1, std=1.0)
    return model


def peft_model(kind: str, n: int = 200, **extra):
    config = peft.FourierFTConfig(
        n_frequency=n, scaling=20.0, target_modules=TARGETS[kind], fan_in_fan_out=kind == "gpt2", **extra
    )
    return peft.get_peft_model(MODELS[kind][0](0), config).eval()


def test_delta_is_scaled_real_part_of_the_inverse_2d_dft_of_the_sparse_spectrum():
    """Against the DFT written out: ΔW[u, v] = α/(MN)·Σ_k c_k·cos(2π(j_k·u/M + l_k·v/N)), no FFT involved."""
    base = nn.Linear(12, 10)  # ΔW is (M, N) = (10, 12)
    adapter = FourierFT.from_base(base, lk.method_config("fourierft", n_frequency=30, scaling=7.0))
    randomize_adapters(adapter, std=1.0)
    j, k = adapter.indices
    assert len(set(zip(j.tolist(), k.tolist(), strict=True))) == 30  # n distinct entries of S
    u = torch.arange(10, dtype=torch.float64)[:, None, None]
    v = torch.arange(12, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (j.double() * u / 10 + k.double() * v / 12)  # (M, N, n)
    expected = 7.0 / 120 * (adapter.fourierft_spectrum.detach().double() * torch.cos(phase)).sum(-1)
    torch.testing.assert_close(adapter.delta_weight(base).detach().double(), expected, atol=1e-6, rtol=1e-5)


def test_entries_are_fixed_by_the_seed_and_only_the_coefficients_train():
    model = MODELS["llama"][0](0)
    lk.attach(model, lk.method_config("fourierft", n_frequency=100), targets="all-linear")
    layers = list(wrappers(model))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 100 * len(layers)
    again = FourierFT.from_base(layers[0][1].base_layer, lk.method_config("fourierft", n_frequency=100))
    assert torch.equal(again.indices, layers[0][1].adapters["default"].indices)
    other = FourierFT.from_base(
        layers[0][1].base_layer, lk.method_config("fourierft", n_frequency=100, random_loc_seed=1)
    )
    assert not torch.equal(other.indices, again.indices)


def test_to_lora_is_exact_at_twice_the_frequency_count():
    """Each frequency adds a real matrix of rank ≤ 2, so rank(ΔW) ≤ 2n and the default factors are exact."""
    base = nn.Linear(32, 24)
    adapter = FourierFT.from_base(base, lk.method_config("fourierft", n_frequency=3))
    randomize_adapters(adapter, std=1.0)
    delta = adapter.delta_weight(base).detach()
    assert torch.linalg.matrix_rank(delta) <= 6
    f = adapter.to_lora(base)
    assert f.A.shape == (6, 32)
    torch.testing.assert_close(f.scale * f.B @ f.A, delta, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_same_weights_in_peft_give_the_same_outputs(kind):
    model, theirs = ours(kind), peft_model(kind)
    with torch.no_grad():
        for name, wrapper in wrappers(model):
            layer = theirs.base_model.model.get_submodule(name)
            adapter = wrapper.adapters["default"]
            assert torch.equal(layer.indices["default"], adapter.indices)  # the same random entries
            layer.fourierft_spectrum["default"].copy_(adapter.fourierft_spectrum)
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), X), logits(lk.merge(model), X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_lorakit_dir_loads_in_peft(kind, tmp_path):
    model = ours(kind)
    lk.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == "FOURIERFT"
    theirs = peft.PeftModel.from_pretrained(MODELS[kind][0](0), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_peft_dir_loads_in_lorakit(kind, tmp_path):
    theirs = peft_model(kind, random_loc_seed=5)  # PEFT's default init: N(0, 1) coefficients
    theirs.save_pretrained(tmp_path / "p")
    loaded = lk.load_adapter(MODELS[kind][0](0), tmp_path / "p")
    torch.testing.assert_close(logits(loaded, X), logits(theirs, X), atol=1e-5, rtol=1e-5)
    assert next(w for _, w in wrappers(loaded)).adapters["default"].config.random_loc_seed == 5


def test_too_many_frequencies_embeddings_and_patterns_are_clear_errors(tmp_path):
    with pytest.raises(lk.ConfigError, match=r"n_frequency=2049 exceeds the 2048 entries .*d_in=64, d_out=32"):
        lk.attach(MODELS["llama"][0](0), lk.method_config("fourierft", n_frequency=2049), targets=["k_proj"])
    with pytest.raises(lk.TargetError, match="fourierft"):
        lk.attach(MODELS["llama"][0](0), lk.method_config("fourierft"), targets=["embed_tokens"])
    peft_model("llama", n_frequency_pattern={"q_proj": 50}).save_pretrained(tmp_path / "p")
    with pytest.raises(lk.AdapterFormatError, match="n_frequency_pattern"):
        lk.load_adapter(MODELS["llama"][0](0), tmp_path / "p")
    assert L.dims(MODELS["llama"][0](0).model.layers[0].self_attn.k_proj) == (64, 32)
