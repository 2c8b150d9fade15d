"""WaRA: ΔW = IDWT(s·B·A) — the LoRA product holds the 2-D Haar wavelet coefficients of the update. The Haar IDWT
matches a plain reference (and PEFT's independent Haar reconstruction); merged = unmerged; the model starts as the
base with LoRA's parameter count; dimensions the wavelet level cannot halve are a clear error."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.wara import Wara, idwt2
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()


def reference_idwt(coeffs: torch.Tensor, level: int) -> torch.Tensor:
    """Textbook inverse 2-D Haar (orthonormal, Mallat's pyramid), one 2×2 output block at a time.

    At each level, from the deepest: the top-left (h, w) block holds quadrants a = LL, b = LH (top right),
    c = HL (bottom left), d = HH, each (h/2, w/2), and
      x[2i, 2j] = (a + b + c + d)/2,   x[2i, 2j+1] = (a − b + c − d)/2,
      x[2i+1, 2j] = (a + b − c − d)/2, x[2i+1, 2j+1] = (a − b − c + d)/2.
    """
    out = coeffs.clone()
    for depth in reversed(range(level)):
        h, w = coeffs.shape[0] >> depth, coeffs.shape[1] >> depth
        block = out[:h, :w].clone()
        for i in range(h // 2):
            for j in range(w // 2):
                a, b = block[i, j], block[i, j + w // 2]
                c, d = block[i + h // 2, j], block[i + h // 2, j + w // 2]
                out[2 * i, 2 * j] = (a + b + c + d) / 2
                out[2 * i, 2 * j + 1] = (a - b + c - d) / 2
                out[2 * i + 1, 2 * j] = (a + b - c - d) / 2
                out[2 * i + 1, 2 * j + 1] = (a - b - c + d) / 2
    return out


@pytest.mark.parametrize("level", [1, 2, 3])
def test_haar_idwt_matches_the_plain_reference_and_is_orthonormal(level):
    C = torch.randn(16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(level))
    X_ = idwt2(C, level)
    torch.testing.assert_close(X_, reference_idwt(C, level), atol=1e-12, rtol=0)
    torch.testing.assert_close(X_.norm(), C.norm())  # an orthonormal transform keeps the energy
    assert X_.shape == C.shape


def test_one_level_matches_peft_haar_reconstruction():
    """PEFT's WaveFT ships an independent (conv_transpose) Haar reconstruction in pywt's convention."""
    waverec2d = pytest.importorskip("peft.tuners.waveft.waverec2d").waverec2d
    C = torch.randn(16, 24, dtype=torch.float64)
    LL, LH, HL, HH = C[:8, :12], C[:8, 12:], C[8:, :12], C[8:, 12:]
    theirs = waverec2d([LL, (HL, LH, HH)], "haar")  # pywt's (cH, cV, cD): detail along rows first
    torch.testing.assert_close(idwt2(C, 1), theirs, atol=1e-12, rtol=0)


def _bases():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # (out=24, in=16)
    nn.init.normal_(conv.weight)
    return [nn.Linear(16, 24), conv, nn.Embedding(48, 24)]


@pytest.mark.parametrize("level", [1, 2])
def test_delta_is_the_idwt_of_the_scaled_lora_product_and_merge_is_exact(level):
    for base in _bases():
        adapter = Wara.from_base(base, lk.method_config("wara", r=2, alpha=3.0, level=level))
        assert torch.equal(adapter.delta_weight(base), torch.zeros_like(base.weight))  # B = 0
        randomize_adapters(adapter, std=0.3)
        delta = reference_idwt(1.5 * adapter.B @ adapter.A, level)  # (out, in)
        torch.testing.assert_close(adapter.delta_weight(base), L.to_base_layout(base, delta), atol=1e-6, rtol=1e-5)
        rank = int(torch.linalg.matrix_rank(delta))
        assert rank == 2 if level == 1 else 2 < rank <= 3 * 2  # one level: a basis change; more: beyond LoRA
        x = torch.randint(0, 48, (2, 5)) if isinstance(base, nn.Embedding) else torch.randn(2, 5, 16)
        layer = copy.deepcopy(base)
        with torch.no_grad():
            layer.weight.add_(adapter.delta_weight(base))
            torch.testing.assert_close(adapter(x, base, base(x)), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_starts_as_the_base_with_lora_parameter_count_and_merges_exactly(make):
    model = make()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("wara", r=4, level=2), targets="all-linear")
    assert torch.equal(logits(model, X), y0)
    expected = sum(4 * sum(L.dims(w.base_layer)) for _, w in wrappers(model))  # r·(d_in + d_out) per layer
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    randomize_adapters(model, std=0.1)
    y = logits(model, X)
    assert (y - y0).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)


def test_dimensions_the_level_cannot_split_are_a_clear_error():
    with pytest.raises(lk.ConfigError, match=r"d_in=12 and d_out=20 must be divisible by 2\^level=8"):
        Wara.from_base(nn.Linear(12, 20), lk.method_config("wara", level=3))
    with pytest.raises(lk.ConfigError, match=r"d_in=64 and d_out=192 must be divisible by 2\^level=128"):
        lk.attach(tiny_gpt2(), lk.method_config("wara", level=7), targets=["c_attn"])
    with pytest.raises(lk.ConfigError, match="level must be an integer >= 1"):
        lk.method_config("wara", level=0)
