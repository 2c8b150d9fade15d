"""The lonas callback (LoNAS): each step trains one sampled sub-adapter's nested slices and leaves the rest as it
was; a sub-adapter extracted from the weight-sharing super-adapter equals the super-adapter run with that config
(1e-6) and PEFT loads it; the search returns configs within the parameter budget; bad input is a clear error
before the first step."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks import CALLBACKS, Callback, register_callback
from lorakit.train.callbacks._api import split_spec
from lorakit.train.callbacks._elastic import batch_loss, elastic_adapters, params, shrink
from lorakit.train.callbacks.lonas import extract, sample_config, search, use_config
from lorakit.train.loop import TrainConfig, train
from tests.helpers import logits, tokens
from tests.train.callbacks._allocators import assert_option_refused, records

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]
R, RANKS = 4, (1, 2, 4)
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
X = tokens(batch=2, length=9, seed=5)


def lora_model(r: int = R, method: str = "lora", base=None, **opts) -> torch.nn.Module:
    cfg = lk.method_config(method, r=r, **({"alpha": 2.0 * r} if method == "lora" else {}), **opts)
    return lk.attach(tiny_llama(0) if base is None else base, cfg, targets=TARGETS)


def run(model, out, spec="lonas:ranks=1|2|4", steps=10, **cfg):
    opts = dict(steps=steps, batch_size=4, lr=1e-2, schedule="constant", seed=3, callbacks=(spec,)) | cfg
    return train(model, records(8, seed=0), TrainConfig(**opts), out_dir=out, pad_id=0, progress=False)


def held_loss(model) -> float:
    """Loss on the training records (the tiny run only learns those: random tokens do not generalise)."""
    ids = torch.tensor([r.input_ids for r in records(8, seed=0)])
    return batch_loss(model, [{"input_ids": ids, "attention_mask": None}])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lonas")
    model = lora_model()
    run(model, root / "run")
    lk.save_adapter(model, root / "super")
    return model.eval(), root


def test_the_option_spec_builds_the_callback():
    name, kwargs = split_spec("lonas:ranks=8|2|4,budget=5000,samples=4")
    cb = CALLBACKS[name].cls(**kwargs)
    assert (cb.ranks, cb.budget, cb.samples) == ((2, 4, 8), 5000, 4)  # type: ignore[attr-defined]
    assert CALLBACKS["lonas"].cls(ranks=4).ranks == (4,)  # type: ignore[attr-defined]


def test_configs_are_a_function_of_seed_and_step():
    modules = [f"m{i}" for i in range(6)]
    draws = [sample_config(3, s, modules, RANKS) for s in range(50)]
    assert draws == [sample_config(3, s, modules, RANKS) for s in range(50)]
    assert {c["m0"] for c in draws} == set(RANKS) and draws != [sample_config(4, s, modules, RANKS) for s in range(50)]
    assert any(len(set(c.values())) > 1 for c in draws)  # modules draw their own ranks


def test_a_step_trains_only_the_sampled_slices_and_leaves_the_rest_as_it_was(tmp_path):
    model = lora_model()
    seen = []

    def snapshot(m):
        return {n: (a.A.detach().clone(), a.B.detach().clone()) for n, a in elastic_adapters(m).items()}

    @register_callback("lonas_probe", help="Record A and B around every step (test).")
    class Probe(Callback):
        def on_step_begin(self, state):
            self.before = snapshot(state.model)

        def on_step_end(self, state):
            seen.append((state.step - 1, self.before, snapshot(state.model)))

    try:
        run(model, tmp_path, steps=5, callbacks=("lonas:ranks=1|2|4", "lonas_probe"), weight_decay=0.1)
    finally:
        CALLBACKS.pop("lonas_probe")
    modules = list(elastic_adapters(model))
    for step, before, now in seen:
        config = sample_config(3, step, modules, RANKS)
        for n, b in config.items():
            (A0, B0), (A1, B1) = before[n], now[n]
            assert A1[b:].equal(A0[b:]) and B1[:, b:].equal(B0[:, b:])  # past c_m: untouched
            assert not B1[:, :b].equal(B0[:, :b])  # the slice trained
    assert all(a.rank_limit is None for a in elastic_adapters(model).values())


def test_every_sub_adapter_learned(trained):
    model, _ = trained
    base = held_loss(tiny_llama(0))
    for r in RANKS:
        with use_config(model, dict.fromkeys(elastic_adapters(model), r)):
            assert held_loss(model) < base - 0.05, r


def mixed_config(model) -> dict[str, int]:
    return {n: RANKS[i % len(RANKS)] for i, n in enumerate(elastic_adapters(model))}


def test_an_extracted_sub_adapter_equals_the_super_adapter_run_with_its_config(trained, tmp_path):
    model, root = trained
    config = mixed_config(model)
    with use_config(model, config):
        want = logits(model, X)
    for source in (root / "super", model):
        out = extract(source, config, tmp_path / ("from_model" if source is model else "from_dir"))
        loaded = lk.load_adapter(tiny_llama(0), out)
        assert {n: w.adapters["default"].A.shape[0] for n, w in wrappers(loaded)} == config
        torch.testing.assert_close(logits(loaded, X), want, atol=1e-6, rtol=1e-6)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "from_dir")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(X).logits, want, atol=1e-5, rtol=1e-5)


def test_the_search_returns_configs_within_the_budget(trained):
    model, _ = trained
    adapters = elastic_adapters(model)
    low, high = (params(adapters, dict.fromkeys(adapters, r)) for r in (1, R))
    for budget in (low, (low + high) // 2, high - 1, high):
        tried = []

        def evaluate(m, tried=tried):
            tried.append(params(adapters, {n: a.rank_limit for n, a in adapters.items()}))
            return held_loss(m)

        config = search(model, evaluate, budget, "1|2|4", samples=6, seed=1)
        assert params(adapters, config) <= budget and set(config.values()) <= set(RANKS)
        assert tried and max(tried) <= budget  # every candidate scored fits the budget too
        assert search(model, held_loss, budget, RANKS, samples=6, seed=1) == config  # seeded
    heuristic = dict.fromkeys(adapters, 2)
    best = search(model, held_loss, params(adapters, heuristic), RANKS, samples=6)
    with use_config(model, best):
        found = held_loss(model)
    with use_config(model, heuristic):
        assert found <= held_loss(model)  # the heuristic is a candidate: the result is no worse


def test_shrinking_to_a_config_leaves_the_outputs_unchanged():
    """(float64: with factors this large, float32 rounding of α/r·(r/b)·B against α/b·B alone nears 1e-6.)"""
    model = lora_model(base=tiny_llama(0).double())
    randomize_adapters(model, seed=2, std=0.3)
    config = mixed_config(model)
    with use_config(model, config):
        want = logits(model, X)
    shrink(model, config)
    assert {n: w.adapters["default"].config.r for n, w in wrappers(model)} == config
    torch.testing.assert_close(logits(model, X), want, atol=1e-6, rtol=1e-6)


def test_a_budgeted_run_saves_the_searched_sub_adapter_within_the_budget(tmp_path):
    model = lora_model()
    adapters = elastic_adapters(model)
    budget = params(adapters, dict.fromkeys(adapters, 2)) + 100
    run(model, tmp_path / "run", spec=f"lonas:ranks=1|2|4,budget={budget},samples=4", steps=6)
    ranks = {n: w.adapters["default"].config.r for n, w in wrappers(model)}
    assert set(ranks.values()) <= set(RANKS)
    assert params(elastic_adapters(model), ranks) <= budget
    lk.save_adapter(model, tmp_path / "sub")
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "sub")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(X).logits, logits(model.eval(), X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "spec", "message"),
    [
        ("dora", "lonas:ranks=1|2", "plain 'lora' adapters"),
        ("lora_bias", "lonas:ranks=1|2", "lora_bias"),
        ("lora", "lonas:ranks=2|8", "largest elastic rank 8 exceeds the attached rank r=4"),
        ("lora", "lonas:ranks=1|4,budget=10", "budget=10 must be an integer number of parameters between"),
        ("lora", "lonas:ranks=1|4,budget=10000000", "budget=10000000 must be an integer number of parameters"),
    ],
)
def test_bad_input_is_a_clear_error_before_training(tmp_path, method, spec, message):
    model = lora_model(lora_bias=True) if method == "lora_bias" else lora_model(method=method)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ConfigError, match=message):
        run(model, tmp_path, spec=spec, steps=2)
    assert all(p.equal(before[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lonas:ranks=a|2", "ranks must be positive integers"),
        ("lonas:ranks=0|2", "ranks must be positive integers"),
        ("lonas:ranks=2,budget=0", "budget must be an integer >= 1"),
        ("lonas:ranks=2,samples=-1", "samples must be an integer >= 0"),
        ("lonas:budget=100", "it takes: ranks, budget, samples, eval_batches"),
    ],
)
def test_bad_options_fail_when_the_config_is_built(spec, message):
    assert_option_refused(spec, message, steps=None)


def test_extract_rejects_a_config_that_does_not_fit(trained, tmp_path):
    model, root = trained
    config = mixed_config(model)
    with pytest.raises(ConfigError, match="no rank for"):
        extract(root / "super", dict(list(config.items())[1:]), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"rank must be an integer in \[1, 4\]"):
        extract(root / "super", dict.fromkeys(config, R + 1), tmp_path / "b")
