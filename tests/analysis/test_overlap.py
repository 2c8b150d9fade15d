"""Subspace overlap and interference between adapters, from factors, against their dense definitions."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.analysis.overlap import compare, interference, subspace_overlap
from lorakit.errors import AdapterFormatError
from lorakit.io.factors import AdapterFactors
from lorakit.methods._api import LoraFactors

OUT, IN = 40, 30


def _random(r: int, seed: int, scale: float = 1.0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), scale)


def _dense(f: LoraFactors) -> torch.Tensor:
    return f.scale * (f.B.double() @ f.A.double())  # (out, in)


def _dense_overlap(fi: LoraFactors, fj: LoraFactors) -> float:
    """Mean cos² of principal angles between the column spaces, from the dense deltas' SVDs."""
    bases = []
    for f in (fi, fj):
        U, S, _ = torch.linalg.svd(_dense(f), full_matrices=False)
        bases.append(U[:, 1e-9 * S[0] < S])
    return float(torch.linalg.svdvals(bases[0].T @ bases[1]).square().mean())


def _dense_interference(fi: LoraFactors, fj: LoraFactors) -> float:
    Di, Dj = _dense(fi), _dense(fj)
    return float(torch.linalg.matrix_norm(Di.T @ Dj) / (torch.linalg.matrix_norm(Di) * torch.linalg.matrix_norm(Dj)))


def test_identical_adapters_overlap_fully():
    f = _random(6, seed=0, scale=2.0)
    assert subspace_overlap(f, f) == pytest.approx(1.0, abs=1e-12)
    s = torch.linalg.svdvals(_dense(f))
    # ‖ΔWᵀΔW‖_F / ‖ΔW‖_F² = sqrt(Σσ⁴) / Σσ²: 1 only for rank 1
    assert interference(f, f) == pytest.approx(float(s.pow(4).sum().sqrt() / s.square().sum()), rel=1e-9)
    assert interference(f, LoraFactors(f.A, f.B, -0.5)) == pytest.approx(interference(f, f), rel=1e-9)


def test_adapters_with_orthogonal_column_spaces_do_not_overlap_or_interfere():
    Q = torch.linalg.qr(torch.randn(OUT, OUT, generator=torch.Generator().manual_seed(1)))[0]
    g = torch.Generator().manual_seed(2)
    fi = LoraFactors(torch.randn(4, IN, generator=g), Q[:, :4] @ torch.randn(4, 4, generator=g), 1.0)
    fj = LoraFactors(torch.randn(5, IN, generator=g), Q[:, 4:9] @ torch.randn(5, 5, generator=g), 3.0)
    assert subspace_overlap(fi, fj) == pytest.approx(0.0, abs=1e-12)
    assert interference(fi, fj) == pytest.approx(0.0, abs=1e-7)


def test_a_subspace_of_the_other_overlaps_fully():
    fi = _random(6, seed=3)
    fj = LoraFactors(torch.randn(2, IN), fi.B[:, :2] @ torch.randn(2, 2), 1.0)  # col(ΔW_j) ⊂ col(ΔW_i)
    assert subspace_overlap(fi, fj) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize(("ri", "rj"), [(4, 4), (2, 7), (8, 3)])
def test_random_pairs_match_the_dense_definitions(ri, rj):
    fi, fj = _random(ri, seed=ri, scale=0.7), _random(rj, seed=10 + rj, scale=1.9)
    assert subspace_overlap(fi, fj) == pytest.approx(_dense_overlap(fi, fj), rel=1e-9)
    assert interference(fi, fj) == pytest.approx(_dense_interference(fi, fj), rel=1e-9)
    assert interference(fi, fj) == pytest.approx(interference(fj, fi), rel=1e-9)


def test_a_zero_delta_gives_nan():
    zero = LoraFactors(torch.randn(3, IN), torch.zeros(OUT, 3), 1.0)
    assert math.isnan(subspace_overlap(zero, _random(3, 0))) and math.isnan(interference(zero, _random(3, 0)))


def test_compare_reports_shared_and_unshared_modules():
    a = AdapterFactors({"x": _random(4, 0), "y": _random(4, 1)}, {"x": "linear", "y": "linear"})
    b = AdapterFactors({"x": _random(4, 0), "z": _random(4, 2)}, {"x": "linear", "z": "linear"})
    c = compare(a, b, "b")
    assert list(c.overlap) == ["x"] and c.only_here == ["y"] and c.only_there == ["z"]
    assert c.mean_overlap == pytest.approx(1.0) and c.overlap["x"] == pytest.approx(1.0)
    wide = AdapterFactors({"x": LoraFactors(torch.randn(4, IN + 1), torch.randn(OUT, 4), 1.0)}, {"x": "linear"})
    with pytest.raises(AdapterFormatError, match="module x"):
        compare(a, wide, "wide")
