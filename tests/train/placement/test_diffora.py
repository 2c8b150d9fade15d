"""The diffora placement (DiffoRA, arXiv:2502.08905): the relaxed DAM gates train (modules whose LoRA can help
the loss gain gate, a module that cannot reach the output keeps σ(0) = ½ exactly), the result is the top-k of the
gates (per module or per type), the same seed gives the same gates, the caller's model (weights, flags, hooks,
mode, global RNG) is untouched, and the full module names work as lk.attach targets."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.testing import tiny_llama
from lorakit.train.placement import build_placement, place
from lorakit.train.placement.diffora import gate_values
from tests.train.placement.toy import SubspaceLM, batches

LIVE = ["blocks.0.aligned", "blocks.0.blind", "blocks.1.aligned", "blocks.1.blind"]
DEAD = ["blocks.0.dead", "blocks.1.dead"]


@pytest.fixture(scope="module")
def searched():
    model, data = SubspaceLM(), batches(4, counting=True)
    placement = build_placement("auto:diffora:k=4,steps=10")
    return placement, placement.choose(model, data, seed=0), model, data


def test_gates_train_and_the_modules_that_matter_are_kept(searched):
    placement, chosen, _, _ = searched
    gates = placement.gates
    assert sorted(gates) == sorted(LIVE + DEAD)
    assert all(gates[n] == 0.5 for n in DEAD)  # no gradient reaches them: the gate stays σ(0)
    assert all(gates[n] > 0.5 for n in LIVE)  # the LoRA steps lower the held loss, so the gates open
    assert chosen == LIVE
    # ``blind`` reaches the output scaled by 0.1: its gate gradient, hence its step, is smaller than ``aligned``'s
    aligned, blind = [gates[n] for n in LIVE if "aligned" in n], [gates[n] for n in LIVE if "blind" in n]
    assert min(aligned) > max(blind)


def test_discretised_to_the_top_k(searched):
    placement, _, model, data = searched
    for k in (1, 3):
        p = build_placement(f"auto:diffora:k={k},steps=10")
        chosen = p.choose(model, data, seed=0)
        assert p.gates == placement.gates  # the same search
        top = sorted(p.gates, key=lambda n: -p.gates[n])[:k]
        assert sorted(chosen) == sorted(top) and len(chosen) == k
    by_type = build_placement("auto:diffora:k=1,per=type,steps=10")
    assert by_type.choose(model, data, seed=0) == [max(by_type.scores, key=by_type.scores.__getitem__)]
    for kind in ("aligned", "blind", "dead"):
        members = [v for n, v in placement.gates.items() if n.endswith(kind)]
        assert by_type.scores[kind] == pytest.approx(sum(members) / len(members))
    default = build_placement("auto:diffora:steps=10")
    assert len(default.choose(model, data, seed=0)) == 3  # half of the 6 candidates


def test_same_seed_same_gates_other_seed_other_gates(searched):
    placement, chosen, model, data = searched
    kw = dict(steps=10, r=4, lr=1e-3, gate_lr=1.0)
    assert gate_values(model, data, seed=0, **kw) == placement.gates  # bit for bit
    assert gate_values(model, data, seed=1, **kw) != placement.gates


def test_the_callers_model_is_untouched():
    model = tiny_llama(0).train()
    model.model.layers[0].mlp.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    data = batches(2)
    chosen = place(model, data, "auto:diffora:k=5,steps=3")
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(not m._forward_hooks for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    lk.attach(model, lk.method_config("lora", r=2), targets=chosen)  # full names are a target list
    assert [n for n, _ in wrappers(model)] == chosen and len(chosen) == 5
    typed = place(tiny_llama(0), data, "auto:diffora:k=2,per=type,steps=3")
    assert len(typed) == 2 and all("." not in t for t in typed)
