"""DyLoRA / QDyLoRA (the dylora callback): one training run, then every rank b in [r_min, r_max] is a usable
model, its rank-b truncation is a standard PEFT LoRA with the sliced model's outputs, and the engine serves
ranks 1..R with each truncation's tokens equal to that rank loaded alone."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.lowrank import nested_B
from lorakit.serve.engine import Engine
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks import CALLBACKS, Callback, register_callback
from lorakit.train.callbacks._api import split_spec
from lorakit.train.callbacks.dylora import sample_rank, truncate
from lorakit.train.data import Record
from lorakit.train.loop import TrainConfig, train

R = 4


def records(n: int = 8) -> list[Record]:
    g = torch.Generator().manual_seed(0)
    return [Record(ids, ids) for ids in torch.randint(4, 256, (n, 12), generator=g).tolist()]


def lora_model(base=None, r: int = R, **opts) -> torch.nn.Module:
    model = base if base is not None else tiny_llama(0)
    return lk.attach(model, lk.method_config("lora", r=r, alpha=2.0 * r, **opts), targets="all-linear")


def set_rank(model: torch.nn.Module, b: int | None) -> None:
    for _, w in wrappers(model):
        w.adapters["default"].rank_limit = b


def loss(model: torch.nn.Module, recs: list[Record]) -> float:
    ids = torch.tensor([r.input_ids for r in recs])
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def run_config(steps=40, callback="dylora:r_min=1", **cfg) -> TrainConfig:
    opts = dict(steps=steps, batch_size=4, lr=1e-2, schedule="constant", seed=3, callbacks=(callback,)) | cfg
    return TrainConfig(**opts)


def run(model, tmp_path, steps=40, callback="dylora:r_min=1", *, on_step=None, resume=False, **cfg):
    opts = dict(out_dir=tmp_path, pad_id=0, progress=False, on_step=on_step, resume=resume)
    return train(model, records(), run_config(steps, callback, **cfg), **opts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A rank-4 LoRA on every linear layer of a tiny Llama, trained once with dylora, saved."""
    root = tmp_path_factory.mktemp("dylora")
    model = lora_model()
    run(model, root / "run")
    lk.save_adapter(model, root / "full")
    return model, root


def test_the_option_spec_builds_the_callback():
    name, kwargs = split_spec("dylora:r_min=2,r_max=3,frozen=true")
    assert (name, kwargs) == ("dylora", {"r_min": 2, "r_max": 3, "frozen": True})
    cb = CALLBACKS["dylora"].cls(**kwargs)
    assert (cb.r_min, cb.r_max, cb.frozen) == (2, 3, True)  # type: ignore[attr-defined]


def test_ranks_are_a_function_of_seed_and_step():
    draws = [sample_rank(3, s, 1, R) for s in range(200)]
    assert draws == [sample_rank(3, s, 1, R) for s in range(200)]
    assert set(draws) == set(range(1, R + 1))
    assert draws != [sample_rank(4, s, 1, R) for s in range(200)]


def test_after_training_every_rank_is_usable_and_better_than_init(trained):
    model, _ = trained
    recs = records()
    set_rank(model, None)
    init = copy.deepcopy(model)
    for _, w in wrappers(init):
        torch.nn.init.zeros_(w.adapters["default"].B)  # the run's start: B = 0, the base model
    before = loss(init, recs)
    after = {}
    for b in range(1, R + 1):
        set_rank(model, b)
        after[b] = loss(model, recs)
    set_rank(model, None)
    assert all(torch.isfinite(torch.tensor(v)) for v in after.values())
    assert all(v < before - 0.1 for v in after.values()), (before, after)  # every rank learned, not only R
    assert loss(model, recs) == pytest.approx(after[R])  # no limit == the full rank R


def test_a_rank_b_step_uses_and_trains_only_the_first_b_components():
    model = lora_model(r=R)
    for _, w in wrappers(model):
        torch.nn.init.normal_(w.adapters["default"].B, std=0.1)
    name, w = next(iter(wrappers(model)))
    adapter = w.adapters["default"]
    x = torch.randn(3, 5, adapter.A.shape[1])
    for b in (1, 2, 3):
        adapter.rank_limit = b
        s_b = adapter.config.alpha / b
        want = w.base_layer(x) + s_b * x @ adapter.A[:b].T @ adapter.B[:, :b].T  # the rank-b LoRA
        adapter.train()
        for grad in (True, False):  # training forward (fused node on a frozen Linear) and the inference path
            with torch.set_grad_enabled(grad):
                got = w(x)
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
        adapter.A.grad = adapter.B.grad = None
        w(x).pow(2).sum().backward()
        assert adapter.A.grad is not None and adapter.B.grad is not None
        assert adapter.A.grad[b:].abs().max() == 0 and adapter.B.grad[:, b:].abs().max() == 0
        assert adapter.A.grad[:b].abs().max() > 0 and adapter.B.grad[:, :b].abs().max() > 0
    adapter.rank_limit = None
    assert nested_B(adapter.B, R).equal(adapter.B)


def snapshot(model):
    return {
        n: (w.adapters["default"].A.detach().clone(), w.adapters["default"].B.detach().clone())
        for n, w in wrappers(model)
    }


@pytest.mark.parametrize("frozen", [False, True])
def test_the_optimizer_step_changes_only_the_components_the_step_trained(tmp_path, frozen):
    """AdamW's momentum and weight decay would move components a step did not train; the callback keeps them."""
    model = lora_model()
    seen: list[tuple[int, dict, dict]] = []

    @register_callback("dylora_probe", help="Record A and B around every step (test).")
    class Probe(Callback):
        def on_step_begin(self, state):
            self.before = snapshot(state.model)

        def on_step_end(self, state):  # after dylora's: the step as it stays
            seen.append((sample_rank(state.config.seed, state.step - 1, 1, R), self.before, snapshot(state.model)))

    spec = f"dylora:frozen={str(frozen).lower()}"
    try:
        run(model, tmp_path, steps=6, callbacks=(spec, "dylora_probe"), weight_decay=0.1)
    finally:
        CALLBACKS.pop("dylora_probe")
    assert len(seen) == 6
    for b, before, now in seen:
        lo = b - 1 if frozen else 0  # the first component the step trains
        for n in before:
            (A0, B0), (A1, B1) = before[n], now[n]
            assert A1[b:].equal(A0[b:]) and B1[:, b:].equal(B0[:, b:])  # past b: untouched
            assert A1[:lo].equal(A0[:lo]) and B1[:, :lo].equal(B0[:, :lo])  # frozen mode: below b too
            assert not B1[:, lo:b].equal(B0[:, lo:b])  # what the step trains moved
    assert all(w.adapters["default"].rank_limit is None for _, w in wrappers(model))  # full rank after training


def compare_truncations(model, full_dir, root, base_fn, ranks):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    for b in ranks:
        cut = truncate(full_dir, b, root / f"rank{b}")
        set_rank(model, b)
        with torch.no_grad():
            want = model(ids).logits
        loaded = lk.load_adapter(base_fn(), cut)
        assert {w.adapters["default"].A.shape[0] for _, w in wrappers(loaded)} == {b}
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-6, atol=1e-6)
    set_rank(model, None)
    return ids


def test_every_truncation_is_a_standard_lora_with_the_sliced_outputs(trained, tmp_path):
    model, root = trained
    ids = compare_truncations(model, root / "full", tmp_path, lambda: tiny_llama(0), range(1, R + 1))
    for b in (1, 3):
        peft_model = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / f"rank{b}")).eval()
        assert peft_model.peft_config["default"].r == b
        set_rank(model, b)
        with torch.no_grad():
            torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    set_rank(model, None)


def test_qdylora_on_an_nf4_base(tmp_path):
    model = lora_model(lk.quantize(tiny_llama(0), "nf4"))
    run(model, tmp_path / "run", steps=8)
    lk.save_adapter(model, tmp_path / "full")
    compare_truncations(model, tmp_path / "full", tmp_path, lambda: lk.quantize(tiny_llama(0), "nf4"), (1, 2, R))


def greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    ids = out[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_the_engine_serves_ranks_1_to_R_each_as_that_rank_alone(trained, tmp_path):
    _, root = trained
    engine = Engine(tiny_llama(0))
    for b in range(1, R + 1):
        engine.add_adapter(f"rank{b}", truncate(root / "full", b, tmp_path / f"rank{b}"))
    prompts = [[5, 17, 99, 3], [40, 41], [200, 7, 7, 9, 11]]
    names = [f"rank{b}" for b in range(1, R + 1) for _ in prompts]
    outs = engine.generate(prompts * R, names, max_new_tokens=10)
    for b in range(1, R + 1):
        alone = lk.merge(lk.load_adapter(tiny_llama(0), tmp_path / f"rank{b}"))
        for p, out in zip(prompts, outs[(b - 1) * len(prompts) : b * len(prompts)], strict=True):
            assert out.adapter == f"rank{b}"
            assert out.token_ids == greedy(alone, p, 10), b
    assert len({tuple(o.token_ids) for o in outs}) > len(prompts)  # the ranks differ: not all one model


@pytest.mark.parametrize(
    ("method", "spec", "message"),
    [
        ("dora", "dylora", "plain 'lora' adapters"),
        ("vera", "dylora", "plain 'lora' adapters"),
        ("lora_bias", "dylora", "lora_bias, which is scaled by α/r"),
        ("lora", "dylora:r_min=5", "r_min=5 exceeds r_max=4"),
        ("lora", "dylora:r_max=6", "r_max=6 exceeds the smallest attached rank r=4"),
    ],
)
def test_bad_input_is_a_clear_error_before_training(tmp_path, method, spec, message):
    cfg = lk.method_config("lora", r=R, lora_bias=True) if method == "lora_bias" else lk.method_config(method, r=R)
    model = lk.attach(tiny_llama(0), cfg, targets=["q_proj"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ConfigError, match=message):
        run(model, tmp_path, steps=2, callback=spec)
    assert all(p.equal(before[n]) for n, p in model.named_parameters() if p.requires_grad)  # nothing trained


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dylora:r_min=0", "r_min must be a positive integer"),
        ("dylora:r_min=3,r_max=2", r"r_min \(3\) must be <= r_max \(2\)"),
        ("dylora:frozen=maybe", "frozen must be true or false"),
        ("dylora:rank=2", "it takes: r_min, r_max, frozen"),
    ],
)
def test_bad_options_fail_when_the_config_is_built(spec, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(callbacks=(spec,))


def test_truncate_rejects_a_rank_past_the_adapter(trained, tmp_path):
    _, root = trained
    with pytest.raises(ConfigError, match=r"rank must be an integer in \[1, 4\]"):
        truncate(root / "full", R + 1, tmp_path / "too_big")


class Killed(Exception):
    pass


def test_a_resumed_run_draws_the_same_ranks_and_ends_bit_exact(tmp_path):
    full = lora_model()
    run(full, tmp_path / "full", steps=8, save_every=4)

    def kill(step, _loss):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        run(lora_model(), tmp_path / "run", steps=8, save_every=4, on_step=kill)
    second = lora_model()  # other adapter weights: only the checkpoint carries state over
    for _, w in wrappers(second):
        torch.nn.init.normal_(w.adapters["default"].A)
    result = run(second, tmp_path / "run", steps=8, save_every=4, resume=True)
    assert result.resumed_from == 4
    assert snapshot(second).keys() == snapshot(full).keys()
    for name, (A, B) in snapshot(full).items():
        assert A.equal(snapshot(second)[name][0]) and B.equal(snapshot(second)[name][1]), name


@pytest.mark.parametrize(
    ("targets", "rslora"),
    [(["embed_tokens", "v_proj"], False), ("all-linear", True)],
    ids=["embedding", "rslora"],
)
def test_embedding_and_rslora_adapters_truncate_too(tmp_path, targets, rslora):
    """A LoRA on the token embedding (lora_embedding_A / _B in PEFT's layout) slices and loads the same way; with
    rsLoRA the rank-b slice is scaled by α/√b, which a rank-b use_rslora LoRA with the same alpha reproduces.
    (float64: these random factors are large enough that float32 rounding alone reaches 1e-6 in the logits.)"""
    cfg = lk.method_config("lora", r=R, alpha=3.0, rslora=rslora)
    model = lk.attach(tiny_llama(0).double(), cfg, targets=targets)
    randomize_adapters(model, seed=4, std=0.3)
    w = model.get_submodule("model.layers.0.self_attn.v_proj")
    adapter = w.adapters["default"]
    adapter.rank_limit = 2
    x = torch.randn(2, adapter.A.shape[1], dtype=torch.float64)
    with torch.no_grad():  # α/√b under rsLoRA, α/b otherwise
        want = w.base_layer(x) + 3.0 / (2**0.5 if rslora else 2) * x @ adapter.A[:2].T @ adapter.B[:, :2].T
        torch.testing.assert_close(w(x), want)
    lk.save_adapter(model, tmp_path / "full")
    ids = compare_truncations(model, tmp_path / "full", tmp_path, lambda: tiny_llama(0).double(), (1, 2, 3))
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(0).double(), str(tmp_path / "rank3")).eval()
    set_rank(model, 3)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_truncate_refuses_lora_bias(tmp_path):
    model = lk.attach(tiny_llama(0), lk.method_config("lora", r=R, lora_bias=True), targets=["q_proj"])
    lk.save_adapter(model, tmp_path / "full")
    with pytest.raises(ConfigError, match="lora_bias"):
        truncate(tmp_path / "full", 2, tmp_path / "cut")
