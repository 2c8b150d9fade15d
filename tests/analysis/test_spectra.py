"""Spectra from the factors (QR + r×r SVD) against the same quantities on the materialised ΔW."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.analysis.spectra import delta_svd, effective_rank, spectrum, stable_rank
from lorakit.methods._api import LoraFactors

# (out, in, r, scale): square, tall, wide, r above min(out, in), a negative scale
CASES = [(48, 48, 8, 2.0), (96, 32, 6, 0.5), (24, 80, 4, 1.0), (12, 40, 16, 1.5), (40, 40, 5, -3.0)]


def _factors(out: int, inp: int, r: int, scale: float, seed: int = 0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, generator=g)
    B = torch.randn(out, r, generator=g) * torch.logspace(0, -2, r)  # a decaying spectrum
    return LoraFactors(A, B, scale)


def _dense(f: LoraFactors) -> torch.Tensor:
    return f.scale * (f.B.double() @ f.A.double())  # (out, in)


@pytest.mark.parametrize(("out", "inp", "r", "scale"), CASES)
def test_singular_values_equal_svdvals_of_the_materialised_delta(out, inp, r, scale):
    f = _factors(out, inp, r, scale)
    D = _dense(f)
    ref = torch.linalg.svdvals(D)  # min(out, in) values; only min(r, out, in) can be non-zero
    s = spectrum(f)
    got = torch.tensor(s.singular_values, dtype=torch.float64)
    k = min(r, out, inp)
    assert got.numel() == k
    torch.testing.assert_close(got, ref[:k], rtol=1e-5, atol=1e-5 * float(ref[0]))
    assert all(float(v) < 1e-9 * float(ref[0]) for v in ref[k:])  # the materialised rest is zero


@pytest.mark.parametrize(("out", "inp", "r", "scale"), CASES)
def test_statistics_equal_their_definitions_on_the_materialised_delta(out, inp, r, scale):
    f = _factors(out, inp, r, scale, seed=1)
    D = _dense(f)
    sigma = torch.linalg.svdvals(D)
    fro2 = float(torch.linalg.matrix_norm(D, "fro") ** 2)
    spec2 = float(torch.linalg.matrix_norm(D, 2) ** 2)
    s = spectrum(f)
    k = min(r, out, inp)
    energy = torch.cumsum(sigma[:k] ** 2, 0) / fro2  # E(k) = Σ_{i≤k} σ² / ‖ΔW‖_F²
    torch.testing.assert_close(torch.tensor(s.energy, dtype=torch.float64), energy, rtol=1e-6, atol=1e-9)
    p = sigma[sigma > 1e-9 * sigma[0]] / sigma.sum()  # Roy & Vetterli: p = σ / Σσ
    assert s.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    assert s.stable_rank == pytest.approx(fro2 / spec2, rel=1e-6)
    assert s.fro_norm == pytest.approx(math.sqrt(fro2), rel=1e-6)
    assert s.rank_90 == int((energy < 0.90 - 1e-12).sum()) + 1
    assert s.rank_99 == int((energy < 0.99 - 1e-12).sum()) + 1
    assert s.params == r * (out + inp) and s.rank == r and s.shape == (out, inp)


@pytest.mark.parametrize(("out", "inp", "r", "scale"), CASES)
def test_delta_svd_reconstructs_the_delta_with_orthonormal_factors(out, inp, r, scale):
    f = _factors(out, inp, r, scale, seed=2)
    U, S, Vh = delta_svd(f)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, _dense(f), rtol=1e-9, atol=1e-9)
    eye = torch.eye(S.numel(), dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, eye, atol=1e-10, rtol=0)


def test_flat_and_rank_one_spectra_have_the_textbook_ranks():
    flat = torch.full((6,), 3.0)
    assert effective_rank(flat) == pytest.approx(6.0) and stable_rank(flat) == pytest.approx(6.0)
    one = torch.tensor([2.0, 0.0, 0.0])
    assert effective_rank(one) == pytest.approx(1.0) and stable_rank(one) == pytest.approx(1.0)


def test_a_zero_delta_has_zero_ranks_and_energy():
    f = LoraFactors(torch.randn(4, 16), torch.zeros(8, 4), 2.0)  # a freshly initialised LoRA: B = 0
    s = spectrum(f)
    assert s.singular_values == [0.0] * 4 and s.energy == [0.0] * 4
    assert (s.effective_rank, s.stable_rank, s.fro_norm, s.rank_90, s.rank_99) == (0.0, 0.0, 0.0, 0, 0)
