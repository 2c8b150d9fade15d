"""The plop placement (PLoP, arXiv:2506.20629): NFN scores equal a hand computation from hooked inputs and the
weight matrices, padding is ignored, the chosen types are the k lowest scores, the choice is the same for the
same seed, the module types misaligned with the data are picked, the list works as lk.attach targets, and the
model is left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import tiny_gpt2, tiny_llama
from lorakit.train.placement import build_placement, place
from lorakit.train.placement.plop import feature_norms, nfn_scores, probe_directions
from tests.train.placement.toy import SubspaceLM, batches

TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hand_nfn(model: nn.Module, data: list[dict[str, torch.Tensor]], seed: int) -> dict[str, float]:
    """NFN per type from scratch: hooks keep each Linear's input, then Σ‖W ẑ‖ / Σ‖W ε̂‖ with the weight matrix."""
    inputs: dict[str, list[torch.Tensor]] = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: inputs.setdefault(n, []).append(args[0].detach()))
        for n, m in layers.items()
    ]
    with torch.no_grad():
        for batch in data:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    sums: dict[str, list[float]] = {}
    for name, layer in layers.items():
        weight = layer.weight.detach()  # (d_out, d_in)
        pair = sums.setdefault(name.rsplit(".", 1)[-1], [0.0, 0.0])
        for j, (z, batch) in enumerate(zip(inputs[name], data, strict=True)):
            z = z[batch["attention_mask"].bool()]  # (N, d_in): the real tokens
            z_hat = z / z.norm(dim=-1, keepdim=True)
            eps = probe_directions(seed, j, z.shape[0], z.shape[1])  # (N, d_in), unit rows
            pair[0] += float(F.linear(z_hat, weight).norm(dim=-1).sum())
            pair[1] += float(F.linear(eps, weight).norm(dim=-1).sum())
    return {kind: a / r for kind, (a, r) in sums.items()}


@pytest.fixture(scope="module")
def data():
    return batches(3, seed=0)


def test_scores_equal_the_hand_computation(data):
    model = tiny_llama(0)
    scores = nfn_scores(model, data, seed=3)
    expected = hand_nfn(model, data, seed=3)
    assert sorted(scores) == sorted(TYPES)
    for kind in TYPES:
        assert scores[kind] == pytest.approx(expected[kind], rel=1e-5), kind


def test_probes_are_unit_rows_and_seeded():
    a, b = probe_directions(0, 1, 5, 16), probe_directions(0, 1, 5, 16)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))
    assert torch.equal(a, b) and not torch.equal(a, probe_directions(1, 1, 5, 16))


def test_padding_tokens_do_not_count(data):
    model = tiny_llama(0)
    padded = batches(3, seed=0, pad_tail=5)  # the same sequences with 5 more padding columns
    for kind, score in nfn_scores(model, padded).items():
        assert score == pytest.approx(nfn_scores(model, data)[kind], rel=1e-5)


def test_choice_is_the_k_lowest_scores_and_deterministic(data):
    model = tiny_llama(0)
    placement = build_placement("auto:plop:k=3")
    chosen = placement.choose(model, data, seed=0)
    assert chosen == sorted(placement.scores, key=placement.scores.__getitem__)[:3]
    assert placement.scores == nfn_scores(model, data, seed=0)
    again = build_placement("auto:plop:k=3")
    assert again.choose(model, data, seed=0) == chosen and again.scores == placement.scores  # bit for bit
    # another seed draws other random directions: the baseline sums move, the data sums do not
    norms0, norms1 = feature_norms(model, data, seed=0), feature_norms(model, data, seed=1)
    assert all(norms0[n][0] == norms1[n][0] for n in norms0)
    assert any(norms0[n][1] != norms1[n][1] for n in norms0)


def test_the_type_misaligned_with_the_data_is_chosen():
    """Embeddings in a 3-dim subspace U of width 32: ``aligned`` has its rows in U (NFN ≫ 1), ``blind`` is zero on
    U (NFN ≈ 0), ``dead`` is random (NFN ≈ 1). PLoP adapts the lowest NFN first."""
    model = SubspaceLM()
    scores = nfn_scores(model, batches(2))
    assert scores["blind"] < 1e-4 < 0.5 < scores["dead"] < 2 < scores["aligned"]
    assert place(model, batches(2), "auto:plop:k=1") == ["blind"]
    assert place(model, batches(2), "auto:plop:k=2") == ["blind", "dead"]


def test_targets_attach_and_the_model_is_unchanged(data):
    model = tiny_llama(0).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = place(model, data, "auto:plop:k=2")
    assert model.training and all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    lk.attach(model, lk.method_config("lora", r=2), targets=chosen)
    names = [n for n, _ in wrappers(model)]
    assert len(names) == 2 * 2 and {n.rsplit(".", 1)[-1] for n in names} == set(chosen)


def test_gpt2_conv1d_and_exclude():
    model = tiny_gpt2(0)
    scores = nfn_scores(model, batches(2))
    assert sorted(scores) == ["c_attn", "c_fc", "c_proj"] and all(0 < s < float("inf") for s in scores.values())
    assert "c_fc" not in nfn_scores(model, batches(2), exclude=["c_fc"])
    assert len(place(model, batches(2), "auto:plop:k=2")) == 2


def test_k_above_the_number_of_types_is_an_error(data):
    with pytest.raises(ConfigError, match="k=8 but the model has only 7 module types"):
        place(tiny_llama(0), data, "auto:plop:k=8")
