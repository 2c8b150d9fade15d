"""TLoRA: W' = T·W₀ + R with T a full-rank tensor-train-matrix transform and R a tensor-train-matrix residual; both
equal their dense Kronecker-sum definitions; T = I and R = 0 at init give the base output; the parameter count
is 2·t_rank·n_o² + 2·r·n_o·n_i; DoRA is reproduced exactly as the special case T = diag(gain), R = T·s·B·A."""

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.lowrank.dora import Dora
from lorakit.methods.lowrank.tlora import Tlora, mode
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()


def kron_terms(left: torch.Tensor, right: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Reference: Σ_k torch.kron(left_k, right_k), cropped to (rows, cols)."""
    return sum(torch.kron(a, b) for a, b in zip(left, right, strict=True))[:rows, :cols]


@pytest.mark.parametrize("d_in, d_out", [(16, 16), (20, 12), (9, 30)])
def test_transform_and_residual_are_their_kronecker_sums_and_merge_is_exact(d_in, d_out):
    base = nn.Linear(d_in, d_out)
    adapter = Tlora.from_base(base, lk.method_config("tlora", r=3, t_rank=2))
    randomize_adapters(adapter, std=0.3)
    with torch.no_grad():
        T = kron_terms(adapter.T1, adapter.T2, d_out, d_out)
        R = kron_terms(adapter.R1, adapter.R2, d_out, d_in)
        torch.testing.assert_close(adapter.transform(), T)
        torch.testing.assert_close(adapter.residual(), R)
        assert torch.linalg.matrix_rank(T) == d_out  # a full-rank transform
        assert torch.linalg.matrix_rank(R) > 3  # the residual is not rank-r bounded like LoRA's
        x = torch.randn(4, d_in)
        torch.testing.assert_close(adapter(x, base, base(x)), x @ (T @ base.weight + R).T + base.bias)
        torch.testing.assert_close(base.weight + adapter.delta_weight(base), T @ base.weight + R)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_identity_transform_and_zero_residual_at_init_give_the_base_output(make):
    model = make()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("tlora", t_rank=2), targets="all-linear")
    for _, w in wrappers(model):
        adapter, d_out = w.adapters["default"], L.dims(w.base_layer)[1]
        assert torch.equal(adapter.transform(), torch.eye(d_out)) and torch.count_nonzero(adapter.residual()) == 0
    assert torch.equal(logits(model, X), y0)
    model.train()
    model(X, labels=X).loss.backward()
    for _, w in wrappers(model):  # every factor but the Gaussian halves of the zero products gets a gradient
        adapter = w.adapters["default"]
        assert all(p.grad.abs().sum() > 0 for p in (adapter.T1, adapter.T2, adapter.R2))


def test_parameter_count():
    model = tiny_llama()
    cfg = lk.method_config("tlora", r=3, t_rank=2)
    lk.attach(model, cfg, targets="all-linear")
    for _, w in wrappers(model):
        d_in, d_out = L.dims(w.base_layer)
        no, ni = mode(d_out), mode(d_in)
        assert no * no >= d_out > (no - 1) ** 2
        expected = 2 * 2 * no * no + 2 * 3 * no * ni
        assert sum(p.numel() for p in w.adapters["default"].parameters()) == expected
        assert lk.REGISTRY["tlora"].param_count(d_in, d_out, cfg) == expected
    spec = lk.REGISTRY["tlora"]
    for d in range(1, 3000):  # the registered formula's float √ agrees with the integer mode size
        assert spec.param_count(d, d, lk.method_config("tlora", r=1, t_rank=1)) == 4 * mode(d) ** 2


def as_kron_sum(M: torch.Tensor, n1: int, m1: int, n2: int, m2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (k, n1, m1), (k, n2, m2) with Σ_k left_k ⊗ right_k = M (n1·n2, m1·m2): the SVD of the rearranged M."""
    rearranged = M.reshape(n1, n2, m1, m2).permute(0, 2, 1, 3).reshape(n1 * m1, n2 * m2)
    U, S, Vh = torch.linalg.svd(rearranged, full_matrices=False)
    return (U * S).T.reshape(-1, n1, m1), Vh.reshape(-1, n2, m2)


def test_dora_is_the_special_case_diagonal_transform_plus_scaled_lora_residual():
    d_in, d_out = 16, 12
    base = nn.Linear(d_in, d_out).double()
    dora = Dora.from_base(base, lk.method_config("dora", r=2, alpha=3.0))
    randomize_adapters(dora, std=0.3)
    x = torch.randn(5, d_in, dtype=torch.float64)
    with torch.no_grad():
        gain = dora.gain(base)  # (out,) = m / ‖W₀ + s·B·A‖_row
        T = torch.diag(gain)  # the transform
        R = gain[:, None] * (dora.scale * dora.B @ dora.A)  # the residual T·s·B·A
        no, ni = mode(d_out), mode(d_in)
        T_pad, R_pad = torch.zeros(no * no, no * no).double(), torch.zeros(no * no, ni * ni).double()
        T_pad[:d_out, :d_out], R_pad[:d_out, :d_in] = T, R
        T1, T2 = as_kron_sum(T_pad, no, no, no, no)
        R1, R2 = as_kron_sum(R_pad, no, ni, no, ni)
        tlora = Tlora.from_base(base, lk.method_config("tlora", t_rank=T1.shape[0], r=R1.shape[0]))
        tlora.import_state({"tlora_T1": T1, "tlora_T2": T2, "tlora_R1": R1, "tlora_R2": R2})
        torch.testing.assert_close(tlora(x, base, base(x)), dora.eval()(x, base, base(x)))
        torch.testing.assert_close(tlora.delta_weight(base), dora.delta_weight(base))
    assert int((T1.flatten(1).norm(dim=1) > 1e-10).sum()) <= no  # a diagonal T needs only TT-rank ≤ n_o


def test_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="t_rank must be a positive integer"):
        lk.method_config("tlora", t_rank=0)
    with pytest.raises(lk.ConfigError, match="r must be a positive integer"):
        lk.method_config("tlora", r=-1)
