"""SoKA: the KPSVD of a synthetic W = Σ A_i⊗B_i recovers it exactly at its true Kronecker rank; the energy threshold
keeps the fewest terms with ≥ τ energy; the forward is the residual base plus Σ kron(A_i, B_i)·x; the model starts as
the base; r·(mn + pq) trainable parameters per layer; merged = unmerged."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.soka import Soka, energy_rank, kpsvd
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()
G = torch.Generator().manual_seed(0)


def kron_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(a, b) for a, b in zip(A, B, strict=True))


def synthetic(sigmas: list[float], m=3, n=4, p=5, q=2) -> torch.Tensor:
    """W = Σ σ_i·U_i⊗V_i with orthonormal vec(U_i), vec(V_i): a known Kronecker spectrum."""
    u = torch.linalg.qr(torch.randn(m * n, len(sigmas), generator=G, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(p * q, len(sigmas), generator=G, dtype=torch.float64))[0]
    return sum(s * torch.kron(u[:, i].view(m, n), v[:, i].view(p, q)) for i, s in enumerate(sigmas))


def test_kpsvd_recovers_a_sum_of_kronecker_products_at_its_true_rank():
    A = torch.randn(3, 4, 6, generator=G, dtype=torch.float64)
    B = torch.randn(3, 5, 2, generator=G, dtype=torch.float64)
    W = kron_sum(A, B)  # (20, 12), Kronecker rank 3
    A_hat, B_hat, S = kpsvd(W, 5, 2)
    assert A_hat.shape == (10, 4, 6) and B_hat.shape == (10, 5, 2)
    assert S[3:].abs().max() < 1e-6 * S[0]  # exactly three terms (to float32 precision)
    torch.testing.assert_close(kron_sum(A_hat[:3], B_hat[:3]).double(), W, atol=1e-5, rtol=1e-5)
    # fewer terms: the best Kronecker approximation, error = the dropped spectrum (Eckart–Young on R(W))
    err = (kron_sum(A_hat[:2], B_hat[:2]).double() - W).norm()
    torch.testing.assert_close(err, S[2].double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tau, k", [(0.5, 1), (0.75, 1), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 4)])
def test_energy_threshold_picks_the_smallest_k_with_tau_of_the_energy(tau, k):
    # energies 16, 4, 1, 0.25 of 21.25: cumulative shares 0.753, 0.941, 0.988, 1.0
    _, _, S = kpsvd(synthetic([4.0, 2.0, 1.0, 0.5]), 5, 2)
    torch.testing.assert_close(
        S[:4].double(), torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert energy_rank(S, tau) == k
    share = (S**2).cumsum(0) / (S**2).sum()
    assert share[k - 1] >= tau - 1e-6 and (k == 1 or share[k - 2] < tau)


@pytest.mark.parametrize("tau, k", [(0.75, 1), (0.9, 2), (0.95, 3), (0.99, 4)])
def test_energy_threshold_sets_each_layers_rank(tau, k):
    W = synthetic([4.0, 2.0, 1.0, 0.5], m=4, n=2, p=4, q=4).float()  # (16, 8) = (4·4, 2·4), block 4
    base = nn.Linear(8, 16)
    with torch.no_grad():
        base.weight.copy_(W)
    adapter = Soka.from_base(base, lk.method_config("soka", r=6, block=4, energy=tau))
    assert adapter.A.shape == (k, 4, 2) and adapter.B.shape == (k, 4, 4)
    capped = Soka.from_base(base, lk.method_config("soka", r=2, block=4, energy=0.99))
    assert capped.A.shape[0] == 2  # r caps the selected rank


def _bases():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # (out=24, in=16)
    nn.init.normal_(conv.weight)
    return [nn.Linear(16, 24), conv]


def test_forward_is_the_residual_base_plus_the_kronecker_terms():
    for base in _bases():
        adapter = Soka.from_base(base, lk.method_config("soka", r=3, block=4))
        x = torch.randn(2, 5, 16)
        torch.testing.assert_close(adapter(x, base, base(x)), base(x), atol=0, rtol=0)  # identity at init
        randomize_adapters(adapter, std=0.3)
        W = L.weight_out_in(base).detach()  # (out, in)
        residual = W - kron_sum(adapter.A0, adapter.B0)  # the frozen remainder of W
        expected = x @ residual.T + base.bias + x @ kron_sum(adapter.A, adapter.B).T.detach()  # + Σ kron(A_i, B_i)·x
        torch.testing.assert_close(adapter(x, base, base(x)), expected, atol=1e-5, rtol=1e-5)
        layer = copy.deepcopy(base)
        with torch.no_grad():
            layer.weight.add_(adapter.delta_weight(base))
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_parameter_count_identity_and_merge(make):
    model = make()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("soka", r=4, block=8), targets="all-linear")
    assert torch.equal(logits(model, X), y0)
    expected = sum(4 * ((o // 8) * (i // 8) + 64) for i, o in (L.dims(w.base_layer) for _, w in wrappers(model)))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected  # r·(mn + pq) per layer
    randomize_adapters(model, std=0.05)
    y = logits(model, X)
    assert (y - y0).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)


def test_energy_rank_round_trips_through_a_dir(tmp_path):
    model = tiny_llama()
    lk.attach(model, lk.method_config("soka", r=6, block=8, energy=0.3), targets=["q_proj", "down_proj"])
    ranks = {n: w.adapters["default"].A.shape[0] for n, w in wrappers(model)}
    assert all(1 <= k <= 6 for k in ranks.values())
    randomize_adapters(model, std=0.05)
    lk.save_adapter(model, tmp_path / "a")
    loaded = lk.load_adapter(tiny_llama(), tmp_path / "a")
    assert {n: w.adapters["default"].A.shape[0] for n, w in wrappers(loaded)} == ranks
    torch.testing.assert_close(logits(loaded, X), logits(model, X), atol=1e-6, rtol=0)


def test_shapes_the_kronecker_split_cannot_handle_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="block=5 must divide the layer's d_in=64 and d_out=64"):
        lk.attach(tiny_llama(), lk.method_config("soka", block=5), targets=["q_proj"])
    with pytest.raises(lk.ConfigError, match=r"r=20 exceeds the Kronecker rank 8 a 32×64 layer has with block=16"):
        lk.attach(tiny_llama(), lk.method_config("soka", r=20), targets=["k_proj"])
    with pytest.raises(lk.ConfigError, match="energy must be in"):
        lk.method_config("soka", energy=1.5)
    with pytest.raises(lk.TargetError, match="soka.*wte"):
        lk.attach(tiny_gpt2(), lk.method_config("soka"), targets=["wte"])
