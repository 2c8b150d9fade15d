"""Compress then Serve: the shared-basis fit against dense references (exactness, optimality, monotone refinement)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lorakit as lk
from lorakit.compose.compress import compress, fit_module
from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.io.collection import Collection
from lorakit.io.factors import read_factors
from lorakit.testing import randomize_adapters, tiny_llama

RANKS = (2, 3, 4, 6)  # Σ r = 15 ≤ 32 = the smallest min(d_in, d_out) of tiny llama (k_proj, v_proj)
QV = ["q_proj", "v_proj"]


def make_adapter(path, seed: int, r: int, targets="all-linear", method: str = "lora", base_seed: int = 0, **opts):
    model = tiny_llama(base_seed)
    torch.manual_seed(seed)
    lk.attach(model, lk.method_config(method, r=r, **opts), targets=targets)
    randomize_adapters(model, seed=seed, std=0.1)
    return lk.save_adapter(model, path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Four distinct LoRAs of tiny llama: mixed ranks and scales (α ≠ r, one rsLoRA); the last adapts q/v only."""
    root = tmp_path_factory.mktemp("adapters")
    out = [make_adapter(root / f"a{i}", seed=10 + i, r=r, alpha=3.0 * (i + 1)) for i, r in enumerate(RANKS[:2])]
    out.append(make_adapter(root / "a2", seed=12, r=RANKS[2], alpha=4.0, rslora=True))
    out.append(make_adapter(root / "a3", seed=13, r=RANKS[3], targets=QV, alpha=16.0))
    return out


def dense(path) -> dict[str, torch.Tensor]:
    f = read_factors(path)
    return {m: f.delta(m).double() for m in f.factors}


def rel_error(coll: Collection, name: str, deltas: dict[str, torch.Tensor]) -> float:
    """Σ_m ‖ΔW − UΣVᵀ‖² / Σ_m ‖ΔW‖² from dense matrices (the reference for the factor-only report)."""
    f = coll.factors(name)
    lost = sum(float((deltas[m] - f.delta(m).double()).square().sum()) for m in deltas)
    return lost / sum(float(d.square().sum()) for d in deltas.values())


def test_full_total_rank_reconstructs_every_adapter_exactly(dirs, tmp_path):
    report = compress(dirs, tmp_path / "coll", rank=sum(RANKS) + 1)
    coll = Collection.load(report.path)
    assert coll.names == ["a0", "a1", "a2", "a3"] and coll.rank == 16
    assert max(report.errors.values()) < 1e-5
    for path in dirs:
        deltas = dense(path)
        f = coll.factors(path.name)
        for m, d in deltas.items():
            torch.testing.assert_close(f.delta(m).double(), d, atol=1e-5, rtol=1e-5)
    # a3 adapts q/v only: its cores elsewhere are exactly 0 (as is its reconstruction there)
    U, V, cores = coll.modules()["model.layers.0.mlp.up_proj"]
    assert torch.count_nonzero(cores[3]) == 0 and torch.count_nonzero(cores[0]) > 0
    # there R = 16 exceeds the stacked rank 9: the basis is completed, still orthonormal
    torch.testing.assert_close(U.T @ U, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(16), atol=1e-5, rtol=0)
    meta = json.loads((report.path / "collection.json").read_text())
    assert meta["errors"] == pytest.approx(report.errors) and meta["base_model_name_or_path"] == "lorakit/tiny-llama"


def test_reported_errors_equal_dense_errors_and_cores_are_least_squares(dirs, tmp_path):
    report = compress(dirs, tmp_path / "coll", rank=4)
    coll = Collection.load(report.path)
    for path in dirs:
        deltas = dense(path)
        assert report.errors[path.name] == pytest.approx(rel_error(coll, path.name, deltas), rel=1e-4)
        assert 0.01 < report.errors[path.name] < 1
    c = coll.index("a1")
    for m, (U, V, cores) in coll.modules().items():
        U, V = U.double(), V.double()
        eye = torch.eye(4, dtype=torch.float64)
        torch.testing.assert_close(U.T @ U, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(V.T @ V, eye, atol=1e-5, rtol=0)
        d = dense(dirs[1])[m]
        residual = d - U @ cores[c].double() @ V.T
        # the normal equations of min_Σ ‖ΔW − UΣVᵀ‖: Uᵀ(ΔW − UΣVᵀ)V = 0
        assert (U.T @ residual @ V).abs().max() < 1e-5 * d.abs().max()


def test_basis_is_the_top_eigenvectors_of_the_stacked_gram(dirs):
    module = "model.layers.1.self_attn.q_proj"
    fs = [read_factors(p).factors[module] for p in dirs]
    fit = fit_module(fs, rank=5)
    deltas = [f.scale * f.B.double() @ f.A.double() for f in fs]
    for side, basis in (("left", fit.U), ("right", fit.V)):
        gram = sum(d @ d.T if side == "left" else d.T @ d for d in deltas)
        vecs = torch.linalg.eigh(gram).eigenvectors[:, -5:]  # top 5 (ascending order)
        torch.testing.assert_close(basis @ basis.T, vecs @ vecs.T, atol=1e-8, rtol=0)  # same subspace


def test_error_falls_with_rank_and_refinement_never_raises_it(dirs, tmp_path):
    totals = []
    for r in (1, 2, 4, 8, 15):
        report = compress(dirs, tmp_path / f"r{r}", rank=r)
        totals.append(report.history[0])
    assert all(a >= b - 1e-12 for a, b in zip(totals, totals[1:], strict=False)) and totals[-1] < 1e-10
    plain = compress(dirs, tmp_path / "plain", rank=3)
    refined = compress(dirs, tmp_path / "refined", rank=3, iters=3)
    h = refined.history
    assert len(h) == 7 and h[0] == pytest.approx(plain.history[0])
    assert all(b <= a + 1e-12 for a, b in zip(h, h[1:], strict=False))  # each half-step: never worse
    assert h[-1] < h[0]  # and here strictly better than the SVD-of-stacked-factors start
    lost = sum(
        e * sum(float(d.square().sum()) for d in dense(p).values())
        for p, e in zip(dirs, refined.errors.values(), strict=True)
    )
    energy = sum(float(d.square().sum()) for p in dirs for d in dense(p).values())
    assert lost / energy == pytest.approx(h[-1], rel=1e-6)


def test_sizes_and_ratio(dirs, tmp_path):
    report = compress(dirs, tmp_path / "coll", rank=4)
    n_all = 14  # tiny llama: 7 linear modules × 2 layers
    per = {"q_proj": 128, "k_proj": 96, "v_proj": 96, "o_proj": 128, "gate_proj": 192, "up_proj": 192, "down_proj": 192}
    d_sum = sum(per.values()) * 2  # Σ_m (d_in + d_out)
    qv_sum = (per["q_proj"] + per["v_proj"]) * 2
    assert report.params_before == (2 + 3 + 4) * d_sum + 6 * qv_sum
    assert report.params_after == 4 * d_sum + n_all * 4 * 4 * 4
    assert report.bytes_after == 4 * report.params_after and report.ratio == report.params_before / report.params_after


def renamed_base(src, dst, name):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = name
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_refusals(dirs, tmp_path):
    a, b = dirs[0], dirs[1]
    cases = [
        (ConfigError, "at least 2 adapters", dict(adapters=[a], rank=2)),
        (ConfigError, "rank must be a positive integer", dict(adapters=[a, b], rank=0)),
        (ConfigError, "rank 33 is larger than module .*k_proj allows .*at most 32", dict(adapters=[a, b], rank=33)),
        (ConfigError, "name 'x' is used twice", dict(adapters=[a, b], rank=2, names=["x", "x"])),
        (ConfigError, "used twice", dict(adapters=[a, a], rank=2)),
        (ConfigError, "got 1 name", dict(adapters=[a, b], rank=2, names=["x"])),
        (
            AdapterFormatError,
            "made for base 'other/model'",
            dict(adapters=[a, renamed_base(b, tmp_path / "o", "other/model")], rank=2),
        ),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message):
            compress(out=tmp_path / "coll", **kwargs)
    sibling = make_adapter(tmp_path / "sibling", seed=5, r=2, base_seed=1)  # same name, other weights
    with pytest.raises(AdapterFormatError, match="saved on different base weights"):
        compress([a, sibling], tmp_path / "coll", rank=2)
    dora = make_adapter(tmp_path / "dora", seed=5, r=2, method="dora")
    with pytest.raises(
        AdapterFormatError, match=r"'dora' adapter, not a plain LoRA; export it to LoRA first.*lorakit export"
    ):
        compress([a, dora], tmp_path / "coll", rank=2)
    vera = make_adapter(tmp_path / "vera", seed=5, r=2, method="vera", targets=QV)
    with pytest.raises(AdapterFormatError, match="'vera' adapter"):
        compress([a, vera], tmp_path / "coll", rank=2)
    assert not (tmp_path / "coll").exists()  # nothing written by a refused run
    compress([a, b], tmp_path / "coll", rank=2)
    with pytest.raises(ConfigError, match="already exists; pass overwrite=True"):
        compress([a, b], tmp_path / "coll", rank=3)
    compress([a, b], tmp_path / "coll", rank=3, overwrite=True)
    assert Collection.load(tmp_path / "coll").rank == 3
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a collection; refusing"):
        compress([a, b], tmp_path / "plain", rank=2, overwrite=True)
