"""DoTA: the MPO (TT-matrix) of W reconstructs it at full bond dimension; the adapter starts from the truncated MPO."""

import itertools

import pytest
import torch

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.dota import Dota, mode_size, mpo_contract, mpo_decompose
from lorakit.testing import tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

SHAPES = [(64, 64), (32, 64), (50, 70), (128, 64)]


def entry(cores, o: tuple[int, int, int], i: tuple[int, int, int]) -> torch.Tensor:
    """W[o, i] = T₁[o₁,i₁]·T₂[o₂,i₂]·T₃[o₃,i₃] as an explicit product of (d_{k−1} × d_k) matrices."""
    T1, T2, T3 = cores
    return (T1[:, o[0], i[0], :] @ T2[:, o[1], i[1], :] @ T3[:, o[2], i[2], :]).squeeze()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mpo_reconstructs_w_at_full_bond_dimension(shape, dtype):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    n_o, n_i = mode_size(shape[0]), mode_size(shape[1])
    assert n_o**3 >= shape[0] > (n_o - 1) ** 3 and n_i**3 >= shape[1] > (n_i - 1) ** 3
    cores = mpo_decompose(W, bond=n_o * n_i)  # full bond: n_o·n_i
    torch.testing.assert_close(mpo_contract(cores, *shape), W, atol=1e-5, rtol=0)
    # the MPO's definition, entry by entry (mixed radix: o = o₁·n² + o₂·n + o₃)
    for o, i in itertools.islice(zip(range(0, shape[0], 7), range(0, shape[1], 5), strict=False), 6):
        digits_o = (o // n_o**2, o // n_o % n_o, o % n_o)
        digits_i = (i // n_i**2, i // n_i % n_i, i % n_i)
        torch.testing.assert_close(entry(cores, digits_o, digits_i), W[o, i], atol=1e-5, rtol=0)


def unfolding_tails(W: torch.Tensor, bond: int) -> tuple[float, float]:
    """Eckart–Young tails of W's two MPO unfoldings (o₁i₁ | o₂i₂o₃i₃) and (o₁i₁o₂i₂ | o₃i₃) at rank ``bond``."""
    n_o, n_i = mode_size(W.shape[0]), mode_size(W.shape[1])
    p = n_o * n_i
    padded = W.new_zeros(n_o**3, n_i**3)
    padded[: W.shape[0], : W.shape[1]] = W
    T = padded.reshape(n_o, n_o, n_o, n_i, n_i, n_i).permute(0, 3, 1, 4, 2, 5)
    tails = []
    for rows in (p, p * p):
        s = torch.linalg.svdvals(T.reshape(rows, -1))
        tails.append(float(s[bond:].square().sum().sqrt()))
    return tails[0], tails[1]


@pytest.mark.parametrize("shape", SHAPES)
def test_truncated_mpo_error_obeys_the_tt_svd_bounds(shape):
    """Oseledets (2011): max_k tail_k ≤ ‖W − MPO_D(W)‖ ≤ √(Σ_k tail_k²); the error shrinks as D grows.

    The bounds hold for the zero-padded (n_o³, n_i³) matrix the MPO represents, so the error is taken there.
    """
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    n_o, n_i = mode_size(shape[0]), mode_size(shape[1])
    padded = W.new_zeros(n_o**3, n_i**3)
    padded[: shape[0], : shape[1]] = W
    errors = []
    for bond in (1, 2, 4, 8, 16):
        err = float((mpo_contract(mpo_decompose(W, bond), n_o**3, n_i**3) - padded).norm())
        t1, t2 = unfolding_tails(W, bond)
        assert max(t1, t2) - 1e-9 <= err <= (t1**2 + t2**2) ** 0.5 + 1e-9, (bond, err, t1, t2)
        errors.append(err)
    assert all(a >= b for a, b in itertools.pairwise(errors))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_adapter_starts_at_the_base_and_trains_the_cores(make):
    model, x = make(), tokens()
    y0 = logits(model, x)
    lk.attach(model, lk.method_config("dota", bond_dim=4), targets="all-linear")
    assert torch.equal(logits(model, x), y0)  # ΔW = MPO(T) − MPO(T⁰) = 0 exactly
    for _, w in wrappers(model):
        a, W = w.adapters["default"], L.weight_out_in(w.base_layer)
        d = min(4, mode_size(a.d_in) * mode_size(a.d_out))
        p = mode_size(a.d_in) * mode_size(a.d_out)
        assert sum(p_.numel() for p_ in a.parameters()) == p * d * (2 + d)  # the formula in the registry
        # the adapter's cores are the bond-4 MPO of this base weight
        ref = mpo_contract(mpo_decompose(W.detach().double(), 4), a.d_out, a.d_in)
        torch.testing.assert_close(mpo_contract(a.cores, a.d_out, a.d_in).double(), ref, atol=1e-5, rtol=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(2):
        batch = tokens(batch=4, length=16, seed=step)
        opt.zero_grad()
        model(batch, labels=batch).loss.backward()
        opt.step()
    model.eval()
    y = logits(model, x)
    assert (y - y0).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=1e-5)
    for _, w in wrappers(model):  # W + ΔW is the paper's layer W_res + MPO(T), W_res = W − MPO(T⁰)
        a, base = w.adapters["default"], w.base_layer
        W = L.weight_out_in(base)
        paper = (W - mpo_contract(a.initial(), a.d_out, a.d_in)) + mpo_contract(a.cores, a.d_out, a.d_in)
        ours = W + L.to_base_layout(base, a.delta_weight(base))
        torch.testing.assert_close(ours, paper, atol=1e-5, rtol=0)


def test_save_load_round_trip_and_exact_to_lora(tmp_path):
    model, x = tiny_gpt2(), tokens()
    lk.attach(model, lk.method_config("dota"), targets=["c_attn", "c_fc", "wte"])
    lk.testing.randomize_adapters(model, seed=4)
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    loaded = lk.load_adapter(tiny_gpt2(), tmp_path / "a")
    assert {type(w.adapters["default"]) for _, w in wrappers(loaded)} == {Dota}
    torch.testing.assert_close(logits(loaded, x), y, atol=1e-6, rtol=0)
    for _, w in wrappers(model):
        a, base = w.adapters["default"], w.base_layer
        f = a.to_lora(base)
        torch.testing.assert_close(f.scale * f.B @ f.A, a.delta(), atol=1e-5, rtol=0)


def test_clear_errors():
    with pytest.raises(lk.ConfigError, match="bond_dim must be a positive integer"):
        lk.method_config("dota", bond_dim=0)
    with pytest.raises(lk.ConfigError, match="no option"):
        lk.method_config("dota", r=8)


def test_trains_by_name_on_the_cli(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    args = ["train", "--base", str(tiny_checkpoint), "--method", "dota", "--opt", "bond_dim=4", "--steps", "2"]
    args += ["--task", "reverse", "--train-examples", "8", "--eval-examples", "2", "--batch-size", "4"]
    result = CliRunner().invoke(app, [*args, "--max-len", "96", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    loaded = lk.load_adapter(lk.load_base(str(tiny_checkpoint))[0], tmp_path / "a")
    assert {type(w.adapters["default"]) for _, w in wrappers(loaded)} == {Dota}
