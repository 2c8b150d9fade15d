"""LoLDU: P·L·D·U reconstructs W's rank-r LU part; only z (r) and σ (1) train; residual + adapter = W at init."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.lowrank.loldu import Loldu, ldu
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens


def skeleton(W: torch.Tensor, r: int) -> torch.Tensor:
    """The rank-r part that r steps of Gaussian elimination with partial pivoting take out of W.

    Pivoting picks the largest |entry| of the remaining column; with PᵀW = [[A11, A12], [A21, A22]]
    (A11 r×r) the eliminated part is [A11; A21]·A11⁻¹·[A11 A12], computed here by plain elimination.
    """
    A = W.clone()
    rows = list(range(W.shape[0]))
    for j in range(r):  # choose pivot rows like LAPACK's getrf
        p = j + int(A[j:, j].abs().argmax())
        A[[j, p]], rows[j], rows[p] = A[[p, j]], rows[p], rows[j]
        A[j + 1 :] -= A[j + 1 :, j : j + 1] / A[j, j] * A[j]
    Wp = W[rows]  # PᵀW
    part = Wp[:, :r] @ torch.linalg.solve(Wp[:r, :r], Wp[:r])  # (out, in)
    out = torch.empty_like(part)
    out[rows] = part  # back through P
    return out


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_pldu_factors_reconstruct_the_chosen_rank_r_part(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for r in (1, 5, min(shape)):
        PL, D, U = ldu(W, r)
        part = PL @ torch.diag(D) @ U
        torch.testing.assert_close(part, skeleton(W, r), atol=1e-10, rtol=0)
        assert torch.linalg.matrix_rank(part) == r
        torch.testing.assert_close(torch.diagonal(U[:, :r]), torch.ones(r, dtype=W.dtype))  # unit upper
        assert torch.equal(torch.tril(U[:, :r], -1), torch.zeros(r, r, dtype=W.dtype))
        assert float(PL.abs().max()) <= 1 + 1e-12  # partial pivoting: |L| <= 1
    PL, D, U = ldu(W, min(shape))
    torch.testing.assert_close(PL @ torch.diag(D) @ U, W, atol=1e-10, rtol=0)  # full r: P·L·D·U = W


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_residual_plus_adapter_is_the_original_and_r_plus_one_params_train(make):
    model, x = make(), tokens()
    y0 = logits(model, x)
    originals = {n: L.weight_out_in(m).detach().clone() for n, m in model.named_modules() if isinstance(m, Conv1D)}
    originals |= {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    r = 4
    lk.attach(model, lk.method_config("loldu", r=r), targets="all-linear")
    torch.testing.assert_close(logits(model, x), y0, atol=1e-5, rtol=0)
    for name, wrapper in wrappers(model):
        a, base = wrapper.adapters["default"], wrapper.base_layer
        assert {n for n, p in a.named_parameters() if p.requires_grad} == {"z", "sigma"}
        assert sum(p.numel() for p in a.parameters()) == r + 1
        PL, D, U = ldu(originals[name].double(), r)  # the residual is W − σ₀·P·L_r·D_r·U_r, σ₀ = alpha/r
        expected = originals[name].double() - (1.0 / r) * (PL @ torch.diag(D) @ U)
        torch.testing.assert_close(L.weight_out_in(base).double(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.z.detach().double(), D, atol=1e-6, rtol=0)


def test_training_moves_only_the_diagonal_and_scale():
    model, x = tiny_llama(), tokens()
    lk.attach(model, lk.method_config("loldu", r=4), targets="all-linear")
    layers = [w.adapters["default"] for _, w in wrappers(model)]
    frozen = [(a.PL.clone(), a.U.clone(), a.z.detach().clone(), a.sigma.detach().clone()) for a in layers]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    for a, (PL, U, z, sigma) in zip(layers, frozen, strict=True):
        assert torch.equal(a.PL, PL) and torch.equal(a.U, U)
        assert not torch.equal(a.z.detach(), z) and not torch.equal(a.sigma.detach(), sigma)


def test_saved_adapter_reproduces_the_trained_model_on_the_original_base(tmp_path):
    model, x = tiny_llama(), tokens()
    lk.attach(model, lk.method_config("loldu", r=4), targets="all-linear")
    randomize_adapters(model, seed=3)  # stands in for training: z and σ move away from their init
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    loaded = lk.load_adapter(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=1e-5)


def test_to_lora_is_exact_at_rank_r():
    base = nn.Linear(20, 12)
    adapter = Loldu.from_base(base, lk.method_config("loldu", r=5))
    f = adapter.to_lora(base)
    assert f.A.shape == (5, 20) and f.B.shape == (12, 5)
    torch.testing.assert_close(f.scale * f.B @ f.A, adapter.delta_weight(base), atol=1e-6, rtol=0)


def test_clear_errors():
    with pytest.raises(lk.ConfigError, match="r must be a positive integer"):
        lk.method_config("loldu", r=0)
    with pytest.raises(lk.ConfigError, match=r"r=40 exceeds min\(d_in, d_out\) = 32"):
        lk.attach(tiny_llama(), lk.method_config("loldu", r=40), targets=["k_proj"])
    with pytest.raises(lk.TargetError, match="loldu"):  # the shift would also move GPT-2's tied output head
        lk.attach(tiny_gpt2(), lk.method_config("loldu", r=2), targets=["wte"])
    zero = nn.Linear(8, 8)
    nn.init.zeros_(zero.weight)
    with pytest.raises(lk.ConfigError, match="pivots .* include a zero"):
        Loldu.from_base(zero, lk.method_config("loldu", r=2))


def test_trains_by_name_on_the_cli(tiny_checkpoint, tmp_path):
    """`lorakit train --method loldu`: the saved dir is a plain LoRA (rank 2r) for the original checkpoint."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    args = ["train", "--base", str(tiny_checkpoint), "--method", "loldu", "--r", "2", "--steps", "2"]
    args += ["--task", "reverse", "--train-examples", "8", "--eval-examples", "2", "--batch-size", "4"]
    result = CliRunner().invoke(app, [*args, "--max-len", "96", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    loaded = lk.load_adapter(lk.load_base(str(tiny_checkpoint))[0], tmp_path / "a")
    assert {w.adapters["default"].config.r for _, w in wrappers(loaded)} == {4}
