"""The rank machinery allocators share: sensitivity EMA and uncertainty, the cubic budget schedule, an exact
global top-k, and rank surgery that keeps outputs (to 1e-6) when the removed components contribute nothing,
with the optimizer state sliced like the tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.methods.lowrank.adalora import AdaLora
from lorakit.methods.lowrank.lora import Lora
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks._rank import Sensitivity, cubic_budget, keep_components, top_k
from tests.helpers import logits, tokens


def test_sensitivity_is_ema_of_importance_times_ema_of_its_deviation():
    s = Sensitivity(beta1=0.5, beta2=0.25)
    p = torch.tensor([1.0, -2.0])
    s.update("w", p, torch.tensor([3.0, 1.0]))  # I = (3, 2): Ī = (1.5, 1), Ū = 0.75·|I − Ī| = (1.125, 0.75)
    torch.testing.assert_close(s.score("w"), torch.tensor([1.5 * 1.125, 1.0 * 0.75]))
    s.update("w", p, None)  # no gradient: I = 0; Ī = (0.75, 0.5), Ū = 0.25·Ū + 0.75·Ī
    avg = torch.tensor([0.75, 0.5])
    torch.testing.assert_close(s.score("w"), avg * (0.25 * torch.tensor([1.125, 0.75]) + 0.75 * avg))
    s.reset()
    assert not s.avg and not s.unc
    with pytest.raises(ConfigError, match="beta1"):
        Sensitivity(beta1=1.0)


def test_cubic_budget_holds_falls_cubically_and_ends_at_final():
    kw = {"initial": 100, "final": 20, "t_init": 10, "t_final": 10, "total": 50}
    assert [cubic_budget(s, **kw) for s in (0, 10)] == [100, 100]
    assert cubic_budget(25, **kw) == int(80 * 0.5**3 + 20) == 30  # halfway through the 30 falling steps
    assert cubic_budget(40, **kw) == 20 and cubic_budget(41, **kw) == 20
    values = [cubic_budget(s, **kw) for s in range(51)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_top_k_keeps_exactly_the_budget_even_with_ties():
    scores = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([0.1, 0.1]), "c": torch.tensor([0.3])}
    masks = top_k(scores, 3)
    assert masks["a"].tolist() == [True, False, True] and masks["c"].tolist() == [True]
    assert sum(int(m.sum()) for m in top_k(scores, 4).values()) == 4  # one of the three tied 0.1s
    with pytest.raises(ConfigError, match="budget"):
        top_k(scores, 7)


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_keep_components_drops_zero_contribution_components_exactly(method):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    adapter = (AdaLora if method == "adalora" else Lora).from_base(base, lk.method_config(method, r=5))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(std=0.3)
        dead = torch.tensor([1, 3])
        if method == "adalora":
            adapter.E[dead] = 0  # masked singular values
        else:
            adapter.B[:, dead] = 0
    opt = torch.optim.AdamW(adapter.parameters(), lr=0.1)
    x = torch.randn(4, 12)
    adapter(x, base, base(x)).sum().backward()
    opt.step()
    with torch.no_grad():  # the step moved the dead components' factors: zero them again (as a mask does)
        (adapter.E if method == "adalora" else adapter.B[:, :].T)[dead] = 0
    y = adapter(x, base, base(x))
    keep = torch.tensor([0, 2, 4])
    old = {k: t.detach().clone() for k, t in adapter.export_state().items()}
    moments = {k: opt.state[t]["exp_avg"].clone() for k, t in adapter.export_state().items()}
    new = keep_components(adapter, base, keep, opt)
    assert new.config.r == 3 and new.scale == pytest.approx(adapter.scale)
    torch.testing.assert_close(new(x, base, base(x)), y, atol=1e-6, rtol=0)
    for key, t in new.export_state().items():
        dim = [d for d, n in enumerate(old[key].shape) if n == 5][0]
        torch.testing.assert_close(t.detach(), old[key].index_select(dim, keep))
        torch.testing.assert_close(opt.state[t]["exp_avg"], moments[key].index_select(dim, keep))
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in new.parameters()}
    new(x, base, base(x)).sum().backward()
    opt.step()  # the optimizer steps the smaller tensors


def test_keep_components_needs_a_rank():
    base = nn.Linear(8, 8)
    model = lk.attach(nn.Sequential(base), lk.method_config("fourierft", n_frequency=8), targets=["0"])
    adapter = model[0].adapters["default"]
    with pytest.raises(ConfigError, match="no rank"):
        keep_components(adapter, base, torch.tensor([0]))


def test_a_pruned_lora_saves_as_an_ordinary_lora_with_rank_and_alpha_patterns(tmp_path):
    """Surgery on plain LoRA keeps s = α/r by rescaling α: the dir carries rank_pattern and alpha_pattern, and both
    lorakit and PEFT load it with the pruned model's outputs."""
    peft = pytest.importorskip("peft")
    base, x = tiny_llama(0), tokens()
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=4, alpha=8.0), targets=["q_proj", "v_proj"])
    randomize_adapters(model, std=0.3)
    name, w = next(iter(wrappers(model)))
    with torch.no_grad():
        w.adapters["default"].B[:, 1:] = 0  # three components contribute nothing
    y = logits(model, x)
    w.adapters["default"] = keep_components(w.adapters["default"], w.base_layer, torch.tensor([0]))
    torch.testing.assert_close(logits(model, x), y, atol=1e-6, rtol=0)
    path = lk.save_adapter(model, tmp_path / "pruned")
    torch.testing.assert_close(logits(lk.load_adapter(copy.deepcopy(base), path), x), y, atol=1e-6, rtol=0)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=1e-5)
