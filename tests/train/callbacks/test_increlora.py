"""The increlora callback: adding a rank component leaves the model's output unchanged (1e-6) and extends the
optimizer state with zeros; a run grows the highest-scoring modules, stays within the budget and saves an
adapter PEFT loads with the same logits; bad input is a clear error before the first step."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks.increlora import IncreLoraAllocator, grow
from lorakit.train.loop import TrainConfig, train
from lorakit.train.optimizers.adamw import adamw
from tests.helpers import logits
from tests.train.callbacks._allocators import (
    TARGETS,
    X,
    assert_option_refused,
    assert_peft_loads_same,
    assert_refused_before_first_step,
    four_modules,
    ranks,
    records,
    train_capturing,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.mark.parametrize("rslora", [False, True])
def test_adding_a_component_leaves_the_output_and_the_old_optimizer_state_unchanged(rslora):
    torch.manual_seed(0)
    model = lk.attach(
        tiny_llama(1), lk.method_config("lora", r=2, alpha=4.0, rslora=rslora), targets=TARGETS + ["embed_tokens"]
    )
    randomize_adapters(model, seed=1)  # nonzero B: the old components contribute
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()(X).logits.sum().backward()
    opt.step()
    names = [n for n, _ in wrappers(model)]
    grown = [names[0], names[2], names[-1]]  # the embedding included
    olds = {n: w.adapters["default"] for n, w in wrappers(model)}
    moments = {n: opt.state[olds[n].B]["exp_avg"].clone() for n in grown}
    before = logits(model.eval(), X)
    grow(model, grown, opt)
    torch.testing.assert_close(logits(model, X), before, atol=1e-6, rtol=0)
    assert ranks(model) == {n: 3 if n in grown else 2 for n in names}
    for n, w in wrappers(model):
        a = w.adapters["default"]
        assert a.scale == pytest.approx(olds[n].scale)
        if n in grown:
            assert a.A.shape[0] == a.B.shape[1] == 3 and a.A.requires_grad and a.B.requires_grad
            state = opt.state[a.B]["exp_avg"]
            torch.testing.assert_close(state[:, :2], moments[n])
            assert not state[:, 2].any()
            assert any(a.B is p for g in opt.param_groups for p in g["params"])
            assert not any(olds[n].B is p for g in opt.param_groups for p in g["params"])
    model.train()(X).logits.sum().backward()
    opt.step()  # the optimizer steps the grown parameters


def test_a_grown_adapter_from_a_base_shifting_init_saves_for_the_original_base(tmp_path):
    """PiSSA moves its components out of the base; the grown adapter keeps that shift, so the saved dir is still
    a delta for the original base (outputs to 1e-5 after reloading there)."""
    base = tiny_llama(2)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=2, init="pissa"), targets=TARGETS)
    randomize_adapters(model, seed=2)
    names = [n for n, _ in wrappers(model)]
    grow(model, names[:2])
    y = logits(model, X)
    path = lk.save_adapter(model, tmp_path / "pissa")
    torch.testing.assert_close(logits(lk.load_adapter(copy.deepcopy(base), path), X), y, atol=1e-5, rtol=1e-5)


def test_resuming_an_increlora_run_is_refused(tmp_path):
    """The scores are not checkpointed: resuming is a ConfigError, whether the checkpoint holds grown shapes or not."""
    model = lk.attach(tiny_llama(0), lk.method_config("lora", r=1), targets=["q_proj", "v_proj"])
    cfg = TrainConfig(steps=6, batch_size=2, save_every=2, callbacks=("increlora:budget=8,every=1",))

    def crash(step: int, _: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, records(), cfg, out_dir=tmp_path, pad_id=0, progress=False, on_step=crash)
    assert (tmp_path / "checkpoint.pt").is_file()
    fresh = lk.attach(tiny_llama(0), lk.method_config("lora", r=1), targets=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="resume"):  # the checkpoint's grown shapes do not fit the fresh r=1
        train(fresh, records(), cfg, out_dir=tmp_path, pad_id=0, progress=False, resume=True)
    cfg = TrainConfig(steps=6, batch_size=2, save_every=2, callbacks=("increlora:budget=8,every=5",))
    with pytest.raises(KeyboardInterrupt):  # a checkpoint (step 2) from before the first addition
        train(fresh, records(), cfg, out_dir=tmp_path / "early", pad_id=0, progress=False, on_step=crash)
    again = lk.attach(tiny_llama(0), lk.method_config("lora", r=1), targets=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="without --resume"):
        train(again, records(), cfg, out_dir=tmp_path / "early", pad_id=0, progress=False, resume=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tiny_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=1, alpha=2.0), targets=TARGETS)
    budget = len(ranks(model)) + 5
    cfg = TrainConfig(
        steps=14, batch_size=4, lr=0.01, schedule="constant", seed=3, callbacks=(f"increlora:budget={budget},every=2",)
    )
    callback = train_capturing(IncreLoraAllocator, model, cfg, tmp_path_factory.mktemp("run"))
    return base, model.eval(), budget, callback


def test_a_run_grows_the_highest_scoring_modules_within_the_budget(run):
    base, model, budget, callback = run
    final = ranks(model)
    assert sum(final.values()) == budget  # 7 allocations of one, capped at the budget (5 grown)
    grown = [name for _, _, chosen in callback.history for name in chosen]
    assert len(grown) == 5 and [step for step, _, _ in callback.history] == [2, 4, 6, 8, 10]
    for _, scores, chosen in callback.history:
        assert chosen == [max(scores, key=lambda n: scores[n])]  # the argmax of the recorded scores
    assert final == {n: 1 + grown.count(n) for n in final}
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3  # training moved the model


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(run, tmp_path):
    base, model, _, _ = run
    assert_peft_loads_same(base, model, tmp_path / "inc", X)


@pytest.mark.parametrize(
    "spec, method, match",
    [
        ("increlora:budget=5", "lora", "below the attached total rank 12"),
        ("increlora:budget=20", "adalora", "attach method 'lora'"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, match):
    model = four_modules(method)
    assert_refused_before_first_step(IncreLoraAllocator, model, spec, match, tmp_path)


@pytest.mark.parametrize(
    "spec",
    [
        "increlora:budget=8,every=0",
        "increlora:budget=8,every=-2",
        "increlora:budget=0",
        "increlora:budget=8,per_step=0",
    ],
)
def test_bad_options_are_errors_when_the_config_is_built(spec):
    assert_option_refused(spec, "must be an integer >= 1")
