"""merge_adapters on real adapter dirs: exact sums, PEFT add_weighted_adapter parity, and the input checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import lorakit as lk
from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.io.factors import AdapterFactors, read_factors, write_factors
from lorakit.methods._api import LoraFactors
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import logits, tokens

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def make_adapter(path, seed: int, r: int, targets="all-linear", base_seed: int = 0):
    model = tiny_llama(base_seed)
    torch.manual_seed(seed)
    lk.attach(model, lk.method_config("lora", r=r, alpha=8), targets=targets)
    randomize_adapters(model, seed=seed)
    return lk.save_adapter(model, path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Three adapters of one tiny Llama: ranks 4, 2, 4 (scales 2, 4, 2)."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / name, seed, r) for name, seed, r in (("a", 1, 4), ("b", 2, 2), ("c", 3, 4))]


def deltas(path) -> dict[str, torch.Tensor]:
    f = read_factors(path)
    return {m: f.delta(m) for m in f.factors}


def weighted_sum(paths, weights) -> dict[str, torch.Tensor]:
    ds = [deltas(p) for p in paths]
    return {m: sum(w * d[m] for w, d in zip(weights, ds, strict=True)) for m in ds[0]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_write_the_exact_weighted_sum(dirs, tmp_path, method):
    w = [1.0, 0.5, -2.0]
    out = lk.merge_adapters(dirs, method=method, weights=w, out=tmp_path / "m")
    merged, expected = read_factors(out), weighted_sum(dirs, w)
    assert merged.ranks() == dict.fromkeys(expected, 10)  # 4 + 2 + 4
    for m, d in expected.items():
        torch.testing.assert_close(merged.delta(m), d, rtol=0, atol=1e-6)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        block = json.loads(f.metadata()["lorakit"])
    assert block["provenance"]["merge"]["method"] == method and block["provenance"]["merge"]["weights"] == w


def test_svd_rank_and_energy_are_eckart_young_per_module(dirs, tmp_path):
    w = [1.0, 0.5, 0.25]
    expected = weighted_sum(dirs, w)
    out = read_factors(lk.merge_adapters(dirs, method="svd", weights=w, out=tmp_path / "r3", rank=3))
    for m, d in expected.items():
        U, S, Vh = torch.linalg.svd(d)
        assert rel(out.delta(m), U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]) < 1e-5
    out = read_factors(lk.merge_adapters(dirs, method="svd", weights=w, out=tmp_path / "e", energy=0.8))
    for m, d in expected.items():
        U, S, Vh = torch.linalg.svd(d)
        cum = torch.cumsum(S**2, 0) / (S**2).sum()
        k = int((cum < 0.8).sum()) + 1
        assert out.ranks()[m] == k
        assert rel(out.delta(m), U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]) < 1e-5


@pytest.mark.parametrize("method,opts", [("linear", {}), ("svd", {}), ("ties", {"density": 1.0})])
def test_k_copies_with_weights_one_over_k_return_the_adapter(dirs, tmp_path, method, opts):
    out = read_factors(lk.merge_adapters([dirs[0]] * 4, method=method, weights=[0.25] * 4, out=tmp_path / "m", **opts))
    for m, d in deltas(dirs[0]).items():
        assert rel(out.delta(m), d) < 1e-5


def test_delta_methods_refactor_to_the_sum_of_ranks_and_match_their_dense_result(dirs, tmp_path):
    """ties writes the best rank-Σr approximation of the dense TIES result of each module."""
    from lorakit.compose import MERGE_METHODS

    w = [1.0, 0.5, 2.0]
    out = read_factors(lk.merge_adapters(dirs, method="ties", weights=w, out=tmp_path / "t", density=0.5))
    ds = [deltas(p) for p in dirs]
    for m in ds[0]:
        dense = MERGE_METHODS["ties"].fn([d[m] for d in ds], w, density=0.5)
        U, S, Vh = torch.linalg.svd(dense)
        assert out.ranks()[m] == 10
        assert rel(out.delta(m), U[:, :10] @ torch.diag(S[:10]) @ Vh[:10]) < 1e-5


def test_seeded_methods_are_reproducible(dirs, tmp_path):
    read = [read_factors(lk.merge_adapters(dirs, method="dare_ties", out=tmp_path / str(s), seed=s)) for s in (0, 0, 1)]
    m = next(iter(read[0].factors))
    torch.testing.assert_close(read[0].delta(m), read[1].delta(m))
    assert not torch.allclose(read[0].delta(m), read[2].delta(m))


def peft_model_with(paths):
    model = peft.PeftModel.from_pretrained(tiny_llama(0), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    return model.eval()


def peft_deltas(model, name: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        k[len(prefix) :]: layer.get_delta_weight(name).float()
        for k, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and name in layer.lora_A
    }


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_matches_peft_add_weighted_adapter(dirs, tmp_path, method):
    """Where PEFT is exact (cat, svd), the same adapters give the same deltas and logits in both libraries."""
    w = [0.7, 1.5]
    model = peft_model_with(dirs[:2])
    model.add_weighted_adapter(["a0", "a1"], w, "merged", combination_type=method)
    model.set_adapter("merged")
    ours = read_factors(lk.merge_adapters(dirs[:2], method=method, weights=w, out=tmp_path / "m"))
    theirs = peft_deltas(model, "merged")
    assert set(theirs) == set(ours.factors)
    for m, d in theirs.items():
        assert rel(ours.delta(m), d) < 1e-5
    if method == "cat":  # identical tensors: weight·scale in A, B untouched, rank Σ r_i, scale 1
        layer = model.base_model.model.get_submodule(m)
        torch.testing.assert_close(ours.factors[m].A, layer.lora_A["merged"].weight)
        torch.testing.assert_close(ours.factors[m].B, layer.lora_B["merged"].weight)
    adapted = lk.load_adapter(tiny_llama(0), tmp_path / "m")
    x = tokens()
    torch.testing.assert_close(logits(adapted, x), logits(model, x), rtol=1e-5, atol=1e-5)


def test_missing_modules_are_an_error_unless_zero(dirs, tmp_path):
    partial = make_adapter(tmp_path / "qv", seed=5, r=2, targets=["q_proj", "v_proj"])
    with pytest.raises(AdapterFormatError, match=r"qv has no LoRA for 10 module\(s\).*down_proj.*missing=\"zero\""):
        lk.merge_adapters([dirs[0], partial], out=tmp_path / "m")
    out = read_factors(lk.merge_adapters([dirs[0], partial], weights=[1.0, 2.0], out=tmp_path / "m", missing="zero"))
    da, dq = deltas(dirs[0]), deltas(partial)
    for m, d in da.items():
        torch.testing.assert_close(out.delta(m), d + 2.0 * dq[m] if m in dq else d, rtol=0, atol=1e-6)


def test_adapters_of_different_bases_are_refused(dirs, tmp_path):
    other = make_adapter(tmp_path / "other-weights", seed=1, r=4, base_seed=1)  # same name, other weights
    with pytest.raises(AdapterFormatError, match="other-weights and .* different base weights"):
        lk.merge_adapters([dirs[0], other], out=tmp_path / "m")
    renamed = tmp_path / "renamed"
    shutil.copytree(dirs[1], renamed)
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/else"
    (renamed / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match="renamed was made for base 'someone/else'"):
        lk.merge_adapters([dirs[0], renamed], out=tmp_path / "m")


def test_shape_mismatch_names_the_module_and_both_dirs(tmp_path):
    for name, d_in in (("wide", 64), ("narrow", 32)):
        f = LoraFactors(torch.randn(2, d_in), torch.randn(16, 2), 1.0)
        write_factors(tmp_path / name, AdapterFactors({"layer.proj": f}, {"layer.proj": "linear"}))
    with pytest.raises(AdapterFormatError, match=r"layer.proj: .*narrow has .*\(16, 32\) but .*wide .*\(16, 64\)"):
        lk.merge_adapters([tmp_path / "wide", tmp_path / "narrow"], out=tmp_path / "m")


def test_saved_modules_are_refused(tmp_path):
    f = LoraFactors(torch.randn(2, 8), torch.randn(8, 2), 1.0)
    write_factors(tmp_path / "s", AdapterFactors({"p": f}, {"p": "linear"}, {"head": {"weight": torch.ones(2, 2)}}))
    with pytest.raises(AdapterFormatError, match="modules_to_save: head"):
        lk.merge_adapters([tmp_path / "s"], out=tmp_path / "m")


def test_number_and_range_checks(dirs, tmp_path):
    with pytest.raises(ConfigError, match="got 1 weight\\(s\\) for 2 adapter"):
        lk.merge_adapters(dirs[:2], weights=[1.0], out=tmp_path / "m")
    with pytest.raises(ConfigError, match="rank 65 is larger than module model.layers.0.* at most rank 64"):
        lk.merge_adapters(dirs[:2], method="svd", rank=65, out=tmp_path / "m")
    with pytest.raises(ConfigError, match="energy must be in"):
        lk.merge_adapters(dirs[:2], method="svd", energy=1.5, out=tmp_path / "m")
    with pytest.raises(ConfigError, match="at least one adapter"):
        lk.merge_adapters([], out=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_output_dir_that_is_not_an_adapter_is_left_alone(dirs, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(AdapterFormatError, match="notes exists, is not empty"):
        lk.merge_adapters(dirs[:2], out=tmp_path / "notes")
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["keep.txt"]


def test_non_lora_input_is_refused_with_its_path(tmp_path):
    model = tiny_llama(0)
    lk.attach(model, lk.method_config("dora", r=2), targets=["q_proj"])
    path = lk.save_adapter(model, tmp_path / "dora")
    with pytest.raises(AdapterFormatError, match="dora.*not a plain LoRA"):
        lk.merge_adapters([path, path], out=tmp_path / "m")


def test_peft_linear_has_cross_terms_that_lorakit_linear_does_not(dirs, tmp_path):
    """PEFT combines A's and B's separately (issue #3004): B@A = (Σ c_i B_i)(Σ c_j A_j), c_i = √(w_i s_i)."""
    w = [1.0, 0.5]
    pair = [dirs[0], dirs[2]]  # equal ranks, as PEFT's linear requires
    model = peft_model_with(pair)
    model.add_weighted_adapter(["a0", "a1"], w, "merged", combination_type="linear")
    theirs = peft_deltas(model, "merged")
    ours = read_factors(lk.merge_adapters(pair, weights=w, out=tmp_path / "m"))
    fa, fc = read_factors(pair[0]), read_factors(pair[1])
    exact = weighted_sum(pair, w)
    for m, d in theirs.items():
        (A0, B0, s0), (A1, B1, s1) = fa.factors[m], fc.factors[m]
        c0, c1 = (w[0] * s0) ** 0.5, (w[1] * s1) ** 0.5
        torch.testing.assert_close(d, (c0 * B0 + c1 * B1) @ (c0 * A0 + c1 * A1), rtol=1e-5, atol=1e-6)
        assert rel(d, exact[m]) > 0.1  # the cross terms are not small
        torch.testing.assert_close(ours.delta(m), exact[m], rtol=0, atol=1e-6)
