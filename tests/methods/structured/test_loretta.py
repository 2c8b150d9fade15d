"""LoRETTA_rep: A and Bᵀ are tensor trains; the cores contract to the same ΔW as a dense einsum reference and as
the paper's slice-product definition; the trainable count is the TT formula Σ R_{k−1}·n_k·R_k; ΔW = 0 at init."""

import string

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.loretta import Loretta, mode_size
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()


def noisy(base: nn.Module, **opts) -> Loretta:
    adapter = Loretta.from_base(base, lk.method_config("loretta", **opts))
    randomize_adapters(adapter, std=0.3)
    return adapter.eval()  # no dropout


def dense_train(cores, r: int, d: int) -> torch.Tensor:
    """Reference: one einsum over the whole train, (r, n, …, n), flattened row-major and cropped to (r, d)."""
    letters = iter(string.ascii_letters)
    ranks = [next(letters) for _ in range(len(cores) + 1)]
    modes = [next(letters) for _ in cores]
    spec = ",".join(f"{ranks[k]}{modes[k]}{ranks[k + 1]}" for k in range(len(cores)))
    full = torch.einsum(f"{spec}->{ranks[0]}{''.join(modes)}{ranks[-1]}", *cores)  # (1, r, n, …, n, 1)
    return full.reshape(r, -1)[:, :d]


@pytest.mark.parametrize("order, tt_rank", [(1, 3), (2, 4), (3, 5), (4, 2)])
def test_cores_contract_to_the_dense_reference_delta(order, tt_rank):
    base = nn.Linear(40, 27)
    adapter = noisy(base, r=4, alpha=6.0, tt_rank=tt_rank, order=order)
    A = dense_train(list(adapter.A_cores), 4, 40)  # (r, in)
    Bt = dense_train(list(adapter.B_cores), 4, 27)  # (r, out)
    torch.testing.assert_close(adapter.delta_weight(base), 1.5 * Bt.T @ A, atol=1e-6, rtol=1e-5)
    x = torch.randn(3, 40)
    torch.testing.assert_close(adapter(x, base, base(x)), base(x) + 1.5 * x @ A.T @ Bt, atol=1e-5, rtol=1e-5)


def test_an_entry_is_the_product_of_one_slice_per_core():
    """The TT definition: F[i, j₁, j₂, j₃] = G₁[0, i, :] · G₂[:, j₁, :] · G₃[:, j₂, :] · G₄[:, j₃, 0]."""
    base = nn.Linear(64, 27)  # in: modes (4, 4, 4) exactly; out: (3, 3, 3) exactly
    adapter = noisy(base, r=3, order=3, tt_rank=2)
    A, Bt = adapter.factors()
    g = torch.Generator().manual_seed(0)
    for F, cores, n in ((A, adapter.A_cores, 4), (Bt, adapter.B_cores, 3)):
        for _ in range(20):
            i, j1, j2, j3 = (int(torch.randint(m, (1,), generator=g)) for m in (3, n, n, n))
            chain = cores[0][0, i] @ cores[1][:, j1] @ cores[2][:, j2] @ cores[3][:, j3, 0]
            torch.testing.assert_close(F[i, (j1 * n + j2) * n + j3], chain)


def test_trainable_count_is_the_tt_formula_and_far_below_lora():
    model = tiny_llama()
    lk.attach(model, lk.method_config("loretta"), targets="all-linear")
    cfg = lk.method_config("loretta")
    total = 0
    for _, w in wrappers(model):
        adapter, (d_in, d_out) = w.adapters["default"], L.dims(w.base_layer)
        for cores, d in ((adapter.A_cores, d_in), (adapter.B_cores, d_out)):
            n = mode_size(d, cfg.order)
            assert [tuple(c.shape[1:2]) for c in cores] == [(cfg.r,)] + [(n,)] * cfg.order
            tt = sum(c.shape[0] * c.shape[1] * c.shape[2] for c in cores)  # Σ R_{k−1}·n_k·R_k
            assert tt == cfg.tt_rank * cfg.r + (cfg.order - 1) * cfg.tt_rank**2 * n + cfg.tt_rank * n
            total += tt
        assert sum(p.numel() for p in adapter.parameters()) == lk.REGISTRY["loretta"].param_count(d_in, d_out, cfg)
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(8 * sum(L.dims(w.base_layer)) for _, w in wrappers(model))  # LoRA at the same r = 8
    assert total * 2 < lora
    for d_in, d_out in ((576, 576), (576, 1536), (1536, 576), (4096, 4096)):  # SmolLM2 and Llama-7B widths
        assert lk.REGISTRY["loretta"].param_count(d_in, d_out, cfg) * 8 < 8 * (d_in + d_out)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_the_registered_formula_uses_the_same_mode_size_for_every_width(order):
    spec, cfg = lk.REGISTRY["loretta"], lk.method_config("loretta", order=order, tt_rank=1, r=1)
    for d in range(1, 5000):  # with R = r = 1 the count is 2 + order·(n_in + n_out)
        assert spec.param_count(d, 1, cfg) == 2 + order * (mode_size(d, order) + 1), d
        assert mode_size(d, order) ** order >= d > (mode_size(d, order) - 1) ** order


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_rep_variant_starts_at_zero_delta_and_learns(make):
    model = make()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("loretta", dropout=0.0), targets="all-linear")
    for _, w in wrappers(model):
        assert torch.count_nonzero(w.adapters["default"].delta_weight(w.base_layer)) == 0
    assert torch.equal(logits(model, X), y0)
    model.train()
    model(X, labels=X).loss.backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    assert (logits(model.eval(), X) - y0).abs().max() > 1e-4  # the zero last core of B got a gradient


def test_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="tt_rank must be a positive integer"):
        lk.method_config("loretta", tt_rank=0)
    with pytest.raises(lk.ConfigError, match="order must be a positive integer"):
        lk.method_config("loretta", order=1.5)
    with pytest.raises(lk.ConfigError, match="no option.*rank"):
        lk.method_config("loretta", rank=4)
