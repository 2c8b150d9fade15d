"""QWHA: the FWHT equals the dense Hadamard matmul; the forward through it equals y + x·ΔWᵀ with the dense
reference ΔW (never formed in the forward); the quant-aware init lowers ‖W − Q(W) − ΔW‖_F below ‖W − Q(W)‖_F
on every layer, and its adapter, loaded onto the NF4 base, brings the logits closer to the full-precision ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._quant_error import quantization_error
from lorakit.inject import wrappers
from lorakit.methods._hadamard import fwht, hadamard
from lorakit.methods.structured.qwha import Qwha
from lorakit.testing import tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("n", [1, 2, 8, 64, 512])
def test_the_fwht_equals_the_dense_hadamard_matmul(n):
    x = torch.randn(3, n, 5, dtype=torch.float64)
    H = hadamard(n, torch.float64)
    torch.testing.assert_close(fwht(x, dim=1), torch.einsum("bnk,nm->bmk", x, H), atol=1e-12, rtol=0)
    torch.testing.assert_close(fwht(fwht(x, dim=1), dim=1), x, atol=1e-12, rtol=0)  # H·H = I
    torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.randn(3, n + 3 if n > 1 else 3))


def dense_reference(adapter: Qwha) -> torch.Tensor:
    """ΔW = [F·Hᵢₙ] or [Hₒᵤₜ·F·Hᵢₙ], cropped to (out, in), with the dense Hadamard matrices (float64)."""
    Fm = adapter.coefficient_matrix().double()  # (rows, n_in)
    D = Fm @ hadamard(adapter.n_in, torch.float64)
    if adapter.config.transform == "both":
        D = hadamard(adapter.rows, torch.float64).T @ D
    return D[: adapter.d_out, : adapter.d_in]


@pytest.mark.parametrize("transform", ["in", "both"])
@pytest.mark.parametrize("shape", [(64, 32), (48, 80)])  # (in, out): powers of two, and padded to (64, 128)
def test_the_forward_through_the_fwht_equals_the_dense_reference(transform, shape, monkeypatch):
    base = nn.Linear(*shape)
    adapter = Qwha.from_base(base, lk.method_config("qwha", r=2, transform=transform))
    x = torch.randn(4, 3, shape[0])
    y = base(x)
    assert torch.equal(adapter(x, base, y), y)  # zero F: the model starts as the base
    with torch.no_grad():
        adapter.values.normal_()
    expected = y.double() + x.double() @ dense_reference(adapter).T
    monkeypatch.setattr(Qwha, "delta_out_in", lambda self, base: pytest.fail("the forward formed the dense ΔW"))
    torch.testing.assert_close(adapter(x, base, y).double(), expected, atol=1e-5, rtol=0)
    monkeypatch.undo()
    torch.testing.assert_close(adapter.delta_weight(base).double(), dense_reference(adapter), atol=1e-5, rtol=0)
    f = adapter.to_lora(base)  # exact at full rank
    torch.testing.assert_close(f.scale * f.B @ f.A, adapter.delta_out_in(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("transform", ["in", "both"])
def test_the_quant_aware_init_lowers_the_quantization_error_on_every_layer(transform):
    quantized = lk.quantize(tiny_llama(0), "nf4")
    model = lk.attach(tiny_llama(0), lk.method_config("qwha", r=4, transform=transform, quant="nf4"), targets=TARGETS)
    layers = dict(wrappers(model))
    assert len(layers) == 14
    for name, w in layers.items():
        W = L.weight_out_in(w.base_layer).float()
        E = W - L.weight_out_in(quantized.get_submodule(name)).float()  # W − Q(W), the NF4 layer lk.quantize stores
        dW = w.adapters["default"].delta_out_in(w.base_layer).float()
        assert torch.linalg.norm(E - dW) < 0.9 * torch.linalg.norm(E), name  # measured 0.59–0.77 (r=4)


def test_the_init_also_lowers_a_padded_error_and_reads_conv1d():
    cfg = lk.method_config("qwha", r=4, transform="both", quant="int4g")
    model = lk.attach(tiny_gpt2(0), cfg, targets=["c_attn", "c_fc"])
    for name, w in wrappers(model):
        E = quantization_error(w.base_layer, "int4g")  # c_attn: out 192, padded to 256
        assert torch.linalg.norm(E - w.adapters["default"].delta_out_in(w.base_layer)) < torch.linalg.norm(E), name


def test_the_saved_init_on_the_nf4_base_moves_the_logits_toward_full_precision(tmp_path):
    """The documented route: init on the full-precision model, save, load onto lk.quantize(model, 'nf4')."""
    full = logits(tiny_llama(0), X)
    plain = logits(lk.quantize(tiny_llama(0), "nf4"), X)
    lk.save_adapter(lk.attach(tiny_llama(0), lk.method_config("qwha", r=8, quant="nf4"), targets=TARGETS), tmp_path)
    adapted = lk.load_adapter(lk.quantize(tiny_llama(0), "nf4"), tmp_path)
    ratio = torch.linalg.norm(logits(adapted, X) - full) / torch.linalg.norm(plain - full)
    assert ratio < 0.65  # measured 0.56 (r=8, n = 25% of the coefficients; 0.77 at r=4)


def test_an_already_quantized_base_cannot_give_its_quantization_error():
    with pytest.raises(ConfigError, match="already quantized"):
        lk.attach(lk.quantize(tiny_llama(0), "nf4"), lk.method_config("qwha", quant="nf4"), targets=TARGETS)
    with pytest.raises(ConfigError, match="nf4"):  # an unknown kind: a did-you-mean error, nothing left attached
        lk.attach(model := tiny_llama(0), lk.method_config("qwha", quant="nf5"), targets=TARGETS)
    assert not list(wrappers(model))
    with pytest.raises(ConfigError, match="transform must be one of"):
        lk.method_config("qwha", transform="out")
