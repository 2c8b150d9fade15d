"""DCFT: ΔW is the stride-k transposed convolution of the subspace matrix B·A with a k×k kernel (block by block,
s·M[i, j]·K); the kernel size sets the parameter count r·(in + out)/k + k²; merged = unmerged; kernel sizes that
do not divide a layer are a clear error."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.dcft import Dcft
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()


def noisy(base: nn.Module, **opts) -> Dcft:
    adapter = Dcft.from_base(base, lk.method_config("dcft", **opts))
    randomize_adapters(adapter, std=0.3)
    return adapter


@pytest.mark.parametrize("k, r", [(1, 1), (2, 1), (4, 2), (3, 3)])
def test_delta_is_the_transposed_convolution_of_the_subspace_matrix(k, r):
    base = nn.Linear(24, 36)
    adapter = noisy(base, kernel_size=k, r=r, alpha=2.0)
    delta = adapter.delta_weight(base)
    M, K, s = adapter.B @ adapter.A, adapter.kernel, 2.0 / r  # M (out/k, in/k)
    assert M.shape == (36 // k, 24 // k) and delta.shape == (36, 24)
    deconv = F.conv_transpose2d(M[None, None], K[None, None], stride=k)[0, 0]  # the paper's operator
    torch.testing.assert_close(delta, s * deconv)
    by_block = torch.empty(36, 24)  # stride = kernel size: entry (i, j) of M paints block (i, j) with M[i, j]·K
    for i in range(36 // k):
        for j in range(24 // k):
            by_block[i * k : (i + 1) * k, j * k : (j + 1) * k] = s * M[i, j] * K
    torch.testing.assert_close(delta, by_block, atol=1e-6, rtol=1e-5)
    assert torch.linalg.matrix_rank(delta) == min(r, 24 // k) * k  # rank(M ⊗ K) = rank(M)·rank(K)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merged_equals_unmerged(make):
    base = nn.Linear(32, 16)
    adapter = noisy(base, kernel_size=4, r=2)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(adapter(x, base, base(x)), x @ (base.weight + adapter.delta_weight(base)).T + base.bias)
    model = make()
    lk.attach(model, lk.method_config("dcft"), targets="all-linear")
    randomize_adapters(model, std=0.3)
    y = logits(model, X)
    assert (y - logits(make(), X)).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)


def test_kernel_size_sets_the_parameter_count():
    counts = {}
    for k in (1, 2, 4, 8):
        model = tiny_llama()
        lk.attach(model, lk.method_config("dcft", kernel_size=k), targets="all-linear")
        counts[k] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # per layer: A (1, in/k) + B (out/k, 1) + K (k, k)
        assert counts[k] == sum(sum(L.dims(w.base_layer)) // k + k * k for _, w in wrappers(model))
    assert counts[1] > counts[2] > counts[4] < counts[8]  # (in + out)/k shrinks until the k² kernel dominates
    lora = 2 * 8 * (128 + 96 + 96 + 128 + 3 * 192)  # LoRA at r = 8 on the same layers
    assert counts[2] * 8 < lora


def test_init_is_the_official_small_gaussian():
    base = nn.Linear(64, 64)
    adapter = Dcft.from_base(base, lk.method_config("dcft"))
    with torch.no_grad():
        for p in (adapter.A, adapter.B, adapter.kernel):
            assert 0.005 < float(p.std()) < 0.05
        delta = adapter.delta_weight(base)
        assert 0 < float(delta.abs().max()) < 1e-2 * float(base.weight.abs().max())  # not zero, but tiny


def test_kernel_sizes_that_do_not_divide_a_layer_are_clear_errors():
    with pytest.raises(lk.ConfigError, match=r"kernel_size=3 .* in_features \(64\)"):
        lk.attach(tiny_llama(), lk.method_config("dcft", kernel_size=3), targets=["q_proj"])
    with pytest.raises(lk.ConfigError, match="kernel_size must be a positive integer"):
        lk.method_config("dcft", kernel_size=0)
