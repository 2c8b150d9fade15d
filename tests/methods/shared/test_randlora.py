"""RandLoRA: ΔW = s·Σ_j B_j·diag(λ_j)·A·diag(γ_j) over ⌈min(d)/r⌉ fixed random rank-r bases shared by all layers,
only λ, γ train; full-rank ΔW at random init; the same bases and outputs as PEFT's RandLoRA, both ways."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.shared.randlora import RandLora
from lorakit.testing import randomize_adapters
from tests.helpers import MODELS, logits, tokens

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

# square, wide (in < out), tall (in > out) and narrow layers on Llama; Conv1D layers on GPT-2
TARGETS = {"llama": ["q_proj", "k_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
SPARSITY = [{}, {"sparse": True}, {"very_sparse": True}]
X = tokens()


def ours(kind: str, r: int = 8, seed: int = 0, **opts):
    model = MODELS[kind][0](0)
    lk.attach(model, lk.method_config("randlora", r=r, projection_prng_key=seed, **opts), targets=TARGETS[kind])
    randomize_adapters(model, seed=1, std=0.05)
    return model


def peft_model(kind: str, r: int = 8, seed: int = 0, save_projection: bool = False, **opts):
    config = peft.RandLoraConfig(
        r=r,
        target_modules=TARGETS[kind],
        projection_prng_key=seed,
        save_projection=save_projection,
        fan_in_fan_out=kind == "gpt2",
        **opts,
    )
    return peft.get_peft_model(MODELS[kind][0](0), config).eval()


def copy_diagonals(src, dst_peft) -> None:
    with torch.no_grad():
        for name, wrapper in wrappers(src):
            layer = dst_peft.base_model.model.get_submodule(name)
            adapter = wrapper.adapters["default"]
            layer.randlora_lambda["default"].copy_(adapter.randlora_lambda)
            layer.randlora_gamma["default"].copy_(adapter.randlora_gamma)


def reference_delta(adapter: RandLora) -> torch.Tensor:
    """Σ_j B_j·diag(λ_j)·A·diag(γ_j) on the (larger side × smaller side) matrix, oriented to (out, in).

    B_j (hi, r) are fixed random columns of the shared B; PEFT's flattening pairs basis j with columns
    j, j + n, j + 2n, ... of B[:hi, :n] flattened (any fixed random choice is the paper's method).
    """
    A, B = adapter.shared.randlora_A, adapter.shared.randlora_B  # (r, 1, min_dim), (max_dim, n, r)
    lo, hi, n = min(adapter.d_in, adapter.d_out), max(adapter.d_in, adapter.d_out), adapter.n
    lam, gam = adapter.randlora_lambda.detach(), adapter.randlora_gamma.detach()  # (r, n), (n, lo)
    flat = B[:hi, :n].flatten(1)  # (hi, n·r)
    total = sum(flat[:, j::n] @ torch.diag(lam[:, j]) @ A[:, 0, :lo] @ torch.diag(gam[j]) for j in range(n))
    total = adapter.scale * total  # (hi, lo)
    return total if adapter.d_in <= adapter.d_out else total.T


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("opts", SPARSITY, ids=["dense", "sparse", "very_sparse"])
def test_shared_bases_are_peft_s_bit_for_bit(kind, opts):
    model = ours(kind, r=8, seed=7, **opts)
    logits(model, X)  # first use generates the bases
    adapters = [w.adapters["default"] for _, w in wrappers(model)]
    assert len({id(a.shared) for a in adapters}) == 1
    theirs = peft_model(kind, r=8, seed=7, **opts).base_model
    assert torch.equal(adapters[0].shared.randlora_A, theirs.randlora_A["default"])
    assert torch.equal(adapters[0].shared.randlora_B, theirs.randlora_B["default"])
    if opts:
        assert set(adapters[0].shared.randlora_B.unique().sign().tolist()) == {-1.0, 0.0, 1.0}  # ternary


@pytest.mark.parametrize("kind", MODELS)
def test_delta_is_a_sum_of_scaled_random_bases_and_full_rank_at_random_init(kind):
    model = ours(kind, r=8)
    for _, wrapper in wrappers(model):
        base, adapter = wrapper.base_layer, wrapper.adapters["default"]
        delta = L.to_base_layout(base, adapter.delta_weight(base)).detach()  # (out, in)
        torch.testing.assert_close(delta, reference_delta(adapter), atol=1e-5, rtol=1e-4)
        lo = min(adapter.d_in, adapter.d_out)
        assert adapter.n == -(-lo // 8) and torch.linalg.matrix_rank(delta.double()) == lo  # full; a basis: rank 8


def test_only_the_diagonals_train_and_the_count_follows_the_formula():
    model = MODELS["llama"][0](0)
    lk.attach(model, lk.method_config("randlora", r=16), targets="all-linear")
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"randlora_lambda", "randlora_gamma"}
    expected = 0
    for _, w in wrappers(model):
        lo = min(L.dims(w.base_layer))
        expected += -(-lo // 16) * (16 + lo)  # n·r (λ) + n·min(d) (γ)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert not any(b.requires_grad for b in model.buffers())


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("opts", SPARSITY, ids=["dense", "sparse", "very_sparse"])
def test_same_weights_in_peft_give_the_same_outputs(kind, opts):
    model = ours(kind, **opts)
    theirs = peft_model(kind, **opts)
    copy_diagonals(model, theirs)
    y = logits(model, X)
    assert (y - logits(MODELS[kind][0](0), X)).abs().max() > 1e-3
    torch.testing.assert_close(logits(theirs, X), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), X), logits(lk.merge(model), X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_lorakit_dir_loads_in_peft(kind, tmp_path):
    model = ours(kind, sparse=True)
    lk.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "RANDLORA" and config["save_projection"] is False and config["sparse"] is True
    theirs = peft.PeftModel.from_pretrained(MODELS[kind][0](0), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_peft_dir_loads_in_lorakit(kind, tmp_path):
    theirs = peft_model(kind, seed=3, init_weights=False)  # random λ, γ
    theirs.save_pretrained(tmp_path / "p")
    loaded = lk.load_adapter(MODELS[kind][0](0), tmp_path / "p")
    y = logits(theirs, X)
    assert (y - logits(MODELS[kind][0](0), X)).abs().max() > 1e-3
    torch.testing.assert_close(logits(loaded, X), y, atol=1e-5, rtol=1e-5)


def test_peft_dir_with_stored_bases_is_a_clear_error(tmp_path):
    peft_model("llama", save_projection=True).save_pretrained(tmp_path / "p")
    with pytest.raises(lk.AdapterFormatError, match="save_projection"):
        lk.load_adapter(MODELS["llama"][0](0), tmp_path / "p")


def test_embeddings_are_refused_and_bad_options_are_clear_errors():
    with pytest.raises(lk.TargetError, match="randlora"):
        lk.attach(MODELS["llama"][0](0), lk.method_config("randlora"), targets=["embed_tokens"])
    with pytest.raises(lk.ConfigError, match="r must be a positive integer"):
        lk.method_config("randlora", r=0)
    with pytest.raises(lk.ConfigError, match="alpha must be > 0"):
        lk.method_config("randlora", alpha=0)
    assert RandLora.config_from_peft({"peft_type": "VERA"}) is None
