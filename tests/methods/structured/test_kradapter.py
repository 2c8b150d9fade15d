"""KRAdapter: ΔW is the Khatri–Rao (column-wise Kronecker) product of two small factors — equal to the explicit
column-by-column construction; at random init its effective rank far exceeds LoRA's at the same parameter count;
d_min·(k₁ + k₂) trainable parameters; starts as the base; merged = unmerged."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.kradapter import KRAdapter
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()


def khatri_rao(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Textbook Khatri–Rao product of Bᵀ (k₁, c) and Aᵀ (k₂, c): column j is kron(Bᵀ[:, j], Aᵀ[:, j]), (k₁·k₂, c)."""
    return torch.stack([torch.kron(B[j], A[j]) for j in range(B.shape[0])], dim=1)


def effective_rank(M: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli; the authors' measure)."""
    s = torch.linalg.svdvals(M.detach().double())
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p + 1e-30)).sum()))


@pytest.mark.parametrize("d_in, d_out", [(16, 24), (24, 16), (20, 20), (23, 9), (9, 23)])
def test_delta_equals_the_explicit_khatri_rao_construction(d_in, d_out):
    base = nn.Linear(d_in, d_out)
    adapter = KRAdapter.from_base(base, lk.method_config("kradapter", alpha=0.5))
    assert torch.equal(adapter.delta_weight(base), torch.zeros(d_out, d_in))  # B = 0 at init
    randomize_adapters(adapter, std=0.5)
    lo, hi = min(d_in, d_out), max(d_in, d_out)
    k1 = math.isqrt(hi)
    assert adapter.B.shape == (lo, k1) and adapter.A.shape == (lo, math.ceil(hi / k1))
    K = khatri_rao(adapter.B, adapter.A)[:hi]  # (d_max, d_min): the product cut to d_max rows
    expected = 0.5 * (K if d_out > d_in else K.T)  # (out, in): rows on the min side unless out is larger
    torch.testing.assert_close(adapter.delta_weight(base), expected, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, d_in)
    torch.testing.assert_close(adapter(x, base, base(x)), base(x) + x @ expected.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d_in, d_out", [(64, 64), (64, 192), (256, 64)])
def test_random_init_has_higher_effective_rank_than_lora_with_equal_params(d_in, d_out):
    g = torch.Generator().manual_seed(0)
    adapter = KRAdapter.from_base(nn.Linear(d_in, d_out), lk.method_config("kradapter"))
    params = sum(p.numel() for p in adapter.parameters())
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    r = params // (d_in + d_out)  # LoRA's rank at (no more than) the same parameter budget
    lora = torch.randn(d_out, r, generator=g) @ torch.randn(r, d_in, generator=g)
    kr = adapter.delta_weight(nn.Linear(d_in, d_out))
    assert torch.linalg.matrix_rank(kr) == min(d_in, d_out) > r == torch.linalg.matrix_rank(lora)
    assert effective_rank(kr) > 2 * effective_rank(lora)


def _bases():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # (out=24, in=16)
    nn.init.normal_(conv.weight)
    return [conv, nn.Embedding(50, 24)]


def test_conv1d_and_embedding_merge_exactly():
    for base in _bases():
        adapter = KRAdapter.from_base(base, lk.method_config("kradapter"))
        randomize_adapters(adapter, std=0.3)
        x = torch.randint(0, 50, (2, 5)) if isinstance(base, nn.Embedding) else torch.randn(2, 5, 16)
        layer = copy.deepcopy(base)
        with torch.no_grad():
            layer.weight.add_(adapter.delta_weight(base))
            torch.testing.assert_close(adapter(x, base, base(x)), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_parameter_count_identity_at_init_and_merge(make):
    model = make()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("kradapter"), targets="all-linear")
    assert torch.equal(logits(model, X), y0)
    expected = 0
    for _, w in wrappers(model):
        d_in, d_out = L.dims(w.base_layer)
        lo, hi = min(d_in, d_out), max(d_in, d_out)
        expected += lo * (math.isqrt(hi) + math.ceil(hi / math.isqrt(hi)))  # d_min·(k₁ + k₂)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    randomize_adapters(model, std=0.1)
    y = logits(model, X)
    assert (y - y0).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)


def test_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="alpha must be > 0"):
        lk.method_config("kradapter", alpha=0)
    with pytest.raises(lk.ConfigError, match="has no option"):
        lk.method_config("kradapter", r=8)
