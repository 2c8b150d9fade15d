"""SALT: the top-k singular values of W₀ get a trained scale and shift, the rest of the spectrum a rank-r LoRA
(confined to the complement of the top-k singular subspaces); W' = W₀ at init; 2k + r·(d_in + d_out) parameters."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.salt import Salt
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()
KINDS = ["linear", "conv1d", "embedding"]


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        conv = Conv1D(24, 16)  # (out=24, in=16)
        nn.init.normal_(conv.weight)
        return conv
    return nn.Linear(16, 24) if kind == "linear" else nn.Embedding(50, 24)


def noisy(base: nn.Module, **opts) -> Salt:
    adapter = Salt.from_base(base, lk.method_config("salt", k=3, r=2, **opts)).eval()
    randomize_adapters(adapter, std=0.3)
    return adapter


def reference_weight(adapter: Salt, base: nn.Module) -> torch.Tensor:
    """W' from a fresh full SVD: U·diag(σ')·Vᵀ with σ'_top = ReLU(a⊙σ+b), plus the projected LoRA, written out."""
    W = L.weight_out_in(base).detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = adapter.config.k
    S_new = S.clone()
    S_new[:k] = torch.relu(adapter.a.detach() * S[:k] + adapter.b.detach())
    P_out = torch.eye(W.shape[0]) - U[:, :k] @ U[:, :k].T  # projector onto the rest of the output space
    P_in = torch.eye(W.shape[1]) - Vh[:k].T @ Vh[:k]
    lora = adapter.scale * P_out @ adapter.B.detach() @ adapter.A.detach() @ P_in
    return U @ torch.diag(S_new) @ Vh + lora


@pytest.mark.parametrize("kind", KINDS)
def test_at_init_the_merged_weight_is_exactly_the_original(kind):
    base = make_base(kind)
    adapter = Salt.from_base(base, lk.method_config("salt", k=3, r=2)).eval()
    assert torch.equal(adapter.delta_weight(base), torch.zeros_like(base.weight))
    x = torch.randint(0, 50, (2, 5)) if kind == "embedding" else torch.randn(2, 5, 16)
    torch.testing.assert_close(adapter(x, base, base(x)), base(x), atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_the_rescaled_spectrum_plus_the_projected_lora_and_merge_is_exact(kind):
    base = make_base(kind)
    adapter = noisy(base, alpha=4.0)
    W1 = reference_weight(adapter, base)  # (out, in)
    if kind == "embedding":
        x = torch.randint(0, 50, (2, 5))
        expected = W1.T[x]
    else:
        x = torch.randn(2, 5, 16)
        expected = x @ W1.T + base.bias
    torch.testing.assert_close(adapter(x, base, base(x)), expected, atol=1e-5, rtol=1e-5)
    merged = L.weight_out_in(base).detach() + L.to_base_layout(base, adapter.delta_weight(base)).detach()
    torch.testing.assert_close(merged, W1, atol=1e-5, rtol=1e-5)


def test_top_k_singular_values_get_scale_and_shift_and_the_lora_stays_in_the_rest():
    base = make_base("linear")
    adapter = noisy(base)
    U, S, Vh = adapter.U, adapter.S, adapter.Vh  # (out, k), (k,), (k, in)
    merged = L.weight_out_in(base).detach() + adapter.delta_weight(base).detach()
    # on the top-k singular pairs W' acts as diag(ReLU(a⊙σ + b)): the scale and shift, nothing else
    expected = torch.diag(torch.relu(adapter.a.detach() * S + adapter.b.detach()))
    torch.testing.assert_close(U.T @ merged @ Vh.T, expected, atol=1e-5, rtol=1e-5)
    lora = adapter.delta_weight(base).detach() - (U * adapter.spectrum_shift().detach()) @ Vh
    assert lora.abs().max() > 1e-2
    torch.testing.assert_close(U.T @ lora, torch.zeros(3, 16), atol=1e-5, rtol=0)  # no overlap with the top-k
    torch.testing.assert_close(lora @ Vh.T, torch.zeros(24, 3), atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(lora) == 2  # rank r
    with torch.no_grad():
        adapter.b.copy_(-2 * S)  # a shift below zero is clipped: the singular value becomes 0, not negative
        adapter.a.fill_(1.0)
    torch.testing.assert_close(adapter.spectrum_shift().detach(), -S)


def test_trains_2k_plus_lora_parameters_per_layer():
    model = tiny_llama()
    lk.attach(model, lk.method_config("salt", k=4, r=2), targets="all-linear")
    layers = list(wrappers(model))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(2 * 4 + 2 * sum(L.dims(w.base_layer)) for _, w in layers)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"a", "b", "A", "B"}
    model.train()
    model(X, labels=X).loss.backward()
    for _, w in layers:
        adapter = w.adapters["default"]
        assert adapter.a.grad.abs().sum() > 0 and adapter.B.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_saved_adapter_recomputes_the_frozen_svd_and_gives_the_same_outputs(make, tmp_path):
    model = make()
    targets = ["q_proj", "down_proj", "embed_tokens"] if make is tiny_llama else ["c_attn", "c_fc", "wte"]
    lk.attach(model, lk.method_config("salt", k=4, r=2), targets=targets)
    randomize_adapters(model, std=0.1)
    y = logits(model, X)
    assert (y - logits(make(), X)).abs().max() > 1e-3
    lk.save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(logits(lk.load_adapter(make(), tmp_path / "a"), X), y, atol=1e-5, rtol=1e-5)


def test_bad_shapes_and_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match=r"salt k=40 exceeds .* d_in=64, d_out=32 \(32\)"):
        lk.attach(tiny_llama(), lk.method_config("salt", k=40), targets=["k_proj"])
    with pytest.raises(lk.ConfigError, match="k must be a positive integer"):
        lk.method_config("salt", k=0)
    with pytest.raises(lk.ConfigError, match="alpha must be > 0 or None"):
        lk.method_config("salt", alpha=0.0)
