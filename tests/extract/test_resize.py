"""`resize`: the best lower-rank re-factoring of an adapter, from its factors alone."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.extract.resize import factor_svd, resize
from lorakit.io.factors import read_factors
from lorakit.methods._api import LoraFactors
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import logits, tokens


def saved_lora(tmp_path, r: int = 8):
    model = lk.attach(tiny_llama(), lk.method_config("lora", r=r, alpha=2 * r), targets="all-linear")
    randomize_adapters(model, std=0.2)
    lk.save_adapter(model, tmp_path / "in")
    return model


def test_factor_svd_is_the_exact_svd_of_the_delta():
    g = torch.Generator().manual_seed(0)
    f = LoraFactors(torch.randn(6, 40, generator=g), torch.randn(30, 6, generator=g), 0.5)
    U, S, Vh = factor_svd(f)
    delta = f.scale * f.B.double() @ f.A.double()
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, delta)
    torch.testing.assert_close(S, torch.linalg.svdvals(delta)[:6])


def test_resize_to_rank_k_is_eckart_young_optimal(tmp_path):
    saved_lora(tmp_path)
    report = resize(tmp_path / "in", tmp_path / "out", rank=3)
    before, after = read_factors(tmp_path / "in"), read_factors(tmp_path / "out")
    assert set(after.ranks().values()) == {3}
    for module in before.factors:
        delta = before.delta(module).double()
        s = torch.linalg.svdvals(delta)
        optimal = float(s[3:].square().sum().sqrt())
        got = float((after.delta(module).double() - delta).norm())
        assert got == pytest.approx(optimal, rel=1e-5, abs=1e-6), module
        assert report[module]["rel_error"] == pytest.approx(optimal / float(delta.norm()), rel=1e-4)
    assert json.loads((tmp_path / "out" / "resize_report.json").read_text())["rule"] == {"rank": 3}


def test_resize_by_energy_picks_the_minimal_rank_and_full_rank_is_lossless(tmp_path):
    model = saved_lora(tmp_path)
    resize(tmp_path / "in", tmp_path / "e", energy=0.8)
    before, after = read_factors(tmp_path / "in"), read_factors(tmp_path / "e")
    for module, k in after.ranks().items():
        s2 = torch.linalg.svdvals(before.delta(module).double()).square()
        assert k == int(torch.nonzero(torch.cumsum(s2, 0) / s2.sum() >= 0.8)[0]) + 1
    resize(tmp_path / "in", tmp_path / "same", rank=8)
    x = tokens()
    torch.testing.assert_close(
        logits(lk.load_adapter(tiny_llama(), tmp_path / "same"), x), logits(model, x), atol=1e-5, rtol=1e-5
    )


def test_resize_refuses_to_overwrite_its_input_and_needs_a_plain_lora(tmp_path):
    saved_lora(tmp_path)
    with pytest.raises(lk.AdapterFormatError, match="is the input adapter"):
        resize(tmp_path / "in", tmp_path / "in", rank=2)
    dora = lk.attach(tiny_llama(), lk.method_config("dora", r=4), targets=["q_proj"])
    lk.save_adapter(dora, tmp_path / "dora")
    with pytest.raises(lk.AdapterFormatError, match="not a plain LoRA"):
        resize(tmp_path / "dora", tmp_path / "out", rank=2)
    with pytest.raises(lk.ConfigError, match="give one of"):
        resize(tmp_path / "in", tmp_path / "out", rank=2, energy=0.5)
