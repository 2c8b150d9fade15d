"""The adalora callback: parity with PEFT's AdaLoRA (same model, data, seed and initial weights give the same
per-module ranks and logits after N steps), the budget met exactly, rank surgery leaving outputs unchanged, the
result an ordinary adapter (smaller tensors, PEFT loads it, exports as plain LoRA), and clear errors before the
first step for budgets and schedules that cannot fit."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import lorakit as lk
from lorakit.cli.inspect_adapter import summarize
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.io.export import export_vllm
from lorakit.serve.engine import Engine
from lorakit.testing import tiny_llama
from lorakit.train.callbacks.adalora import AdaLoraAllocator
from lorakit.train.data import Record, collate
from lorakit.train.loop import TrainConfig, batch_indices, train
from lorakit.train.optimizers.adamw import adamw
from tests.helpers import logits, tokens

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
STEPS, BATCH, LR, SEED = 14, 4, 0.01, 3
SCHEDULE = {"tinit": 2, "tfinal": 3, "deltaT": 2}  # PEFT's names; the callback's: t_init, t_final, delta_t
INIT_R, TARGET_R, ALPHA, ORTH = 6, 3, 8.0, 0.5
X = tokens(batch=2, length=10, seed=5)


def records() -> list[Record]:
    rows = torch.randint(4, 256, (16, 12), generator=torch.Generator().manual_seed(11)).tolist()
    return [Record(r, r) for r in rows]


def peft_run(base: torch.nn.Module) -> torch.nn.Module:
    """PEFT's documented AdaLoRA loop: loss (with its orthogonality term) -> backward -> optimizer.step ->
    update_and_allocate(step) -> zero_grad, on lorakit's batch order, AdamW, constant lr, no clipping."""
    cfg = peft.AdaLoraConfig(
        init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, lora_dropout=0.0, orth_reg_weight=ORTH,
        target_modules=TARGETS, total_step=STEPS, task_type="CAUSAL_LM", beta1=0.85, beta2=0.85, **SCHEDULE,
    )  # fmt: skip
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    model.train()
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    recs = records()
    for step in range(STEPS):
        batch = collate([recs[i] for i in batch_indices(len(recs), BATCH, step, SEED)], pad_id=0)
        model(**batch).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step + 1)  # optimizer steps done, as lorakit's state.step
        opt.zero_grad(set_to_none=True)
    return model.eval()


def copy_init(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """PEFT's initial P, Λ, Q into lorakit's adapters (same init distribution; the parity is of training)."""
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, w in wrappers(ours):
            a = w.adapters["default"]
            for ours_p, key in ((a.Q, "lora_A"), (a.P, "lora_B"), (a.E, "lora_E")):
                ours_p.copy_(params[f"base_model.model.{name}.{key}.default"])


def lorakit_run(base: torch.nn.Module, tmp_path, init_from: torch.nn.Module) -> torch.nn.Module:
    model = lk.attach(
        copy.deepcopy(base),
        lk.method_config("adalora", r=INIT_R, alpha=ALPHA, orth_reg_weight=ORTH),
        targets=TARGETS,
    )
    copy_init(model, init_from)
    n = len(list(wrappers(model)))
    spec = f"adalora:budget={TARGET_R * n},t_init=2,t_final=3,delta_t=2"
    cfg = TrainConfig(
        steps=STEPS, batch_size=BATCH, lr=LR, schedule="constant", max_grad_norm=None, seed=SEED, callbacks=(spec,)
    )
    train(model, records(), cfg, out_dir=tmp_path, pad_id=0, progress=False)
    return model.eval()


def peft_config_for_init():
    return peft.AdaLoraConfig(
        init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, lora_dropout=0.0, orth_reg_weight=ORTH,
        target_modules=TARGETS, total_step=STEPS, task_type="CAUSAL_LM", **SCHEDULE,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base, lorakit's trained model, PEFT's trained model): the same data, order, seed and initial weights."""
    base = tiny_llama(0)
    torch.manual_seed(0)
    fresh = peft.get_peft_model(copy.deepcopy(base), peft_config_for_init())
    return base, lorakit_run(base, tmp_path_factory.mktemp("run"), fresh), peft_run(base)


def test_same_ranks_and_logits_as_peft_adalora(runs):
    """Tolerance: logits within 1e-5 after 14 steps (measured 2e-7 here, float32 on CPU)."""
    base, ours, theirs = runs
    pattern = theirs.peft_config["default"].rank_pattern
    peft_ranks = {k.removesuffix(".lora_E.default"): sum(v) for k, v in pattern.items()}
    our_ranks = {name: w.adapters["default"].config.r for name, w in wrappers(ours)}
    assert our_ranks == peft_ranks
    assert sum(our_ranks.values()) == TARGET_R * len(our_ranks)  # the budget, exactly
    assert len(set(our_ranks.values())) > 1  # the allocation is not uniform
    y = logits(ours, X)
    assert (y - logits(base, X)).abs().max() > 1e-3  # training moved the model
    torch.testing.assert_close(logits(theirs, X), y, atol=1e-5, rtol=1e-5)


def test_the_result_is_an_ordinary_adapter_peft_loads(runs, tmp_path):
    """Pruned triplets are gone from the tensors; PEFT's AdaLoRA loads the dir (its rank_pattern), lorakit reloads
    it, ``inspect`` lists the per-module ranks, and export writes it as plain LoRA with the same outputs."""
    base, ours, _ = runs
    path = lk.save_adapter(ours, tmp_path / "ada")
    ranks = {name: w.adapters["default"].config.r for name, w in wrappers(ours)}
    for name, w in wrappers(ours):
        a = w.adapters["default"]
        assert a.Q.shape[0] == a.E.shape[0] == a.P.shape[1] == ranks[name]
    y = logits(ours, X)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    torch.testing.assert_close(logits(theirs, X), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lk.load_adapter(copy.deepcopy(base), path), X), y, atol=1e-6, rtol=0)
    summary = summarize(path)
    assert {m["module"]: m["rank"] for m in summary["modules"]} == ranks
    report = export_vllm([path], tmp_path / "out", base=copy.deepcopy(base))
    plain = lk.load_adapter(copy.deepcopy(base), report.adapters["ada"])
    torch.testing.assert_close(logits(plain, X), y, atol=1e-5, rtol=1e-5)
    engine = Engine(copy.deepcopy(base))
    engine.add_adapter("ada", path)  # serving takes it through to_lora (a rank-0 module adds nothing)
    torch.testing.assert_close(
        engine.forward(X, ["ada", None]), torch.stack([y[0], logits(base, X)[1]]), atol=1e-4, rtol=1e-4
    )


def test_rank_surgery_leaves_outputs_unchanged():
    """on_end removes the masked triplets (Λ = 0): outputs equal to 1e-6, tensors smaller."""
    model = lk.attach(tiny_llama(1), lk.method_config("adalora", r=4), targets=TARGETS)
    callback = AdaLoraAllocator(budget=9)
    adapters = [(n, w.adapters["default"]) for n, w in wrappers(model)]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, a in adapters:
            a.E.normal_(generator=gen)
    keep = torch.zeros(4 * len(adapters), dtype=torch.bool)
    keep[torch.randperm(keep.numel(), generator=gen)[:9]] = True
    callback.masks = {n: m for (n, _), m in zip(adapters, keep.view(len(adapters), 4), strict=True)}
    callback.apply([(n, None, a) for n, a in adapters])
    before = logits(model, X)
    callback.on_end(SimpleNamespace(model=model, optimizer=None))
    torch.testing.assert_close(logits(model, X), before, atol=1e-6, rtol=0)
    assert sum(w.adapters["default"].config.r for _, w in wrappers(model)) == 9


def _fit(tmp_path, spec, *, method="adalora", steps=10):
    model = lk.attach(tiny_llama(0), lk.method_config(method, r=4), targets=["q_proj", "v_proj"])  # 4 modules
    cfg = TrainConfig(steps=steps, batch_size=2, callbacks=(spec,))
    train(model, records(), cfg, out_dir=tmp_path, pad_id=0, progress=False)


@pytest.mark.parametrize(
    "spec, method, match",
    [
        ("adalora:budget=17", "adalora", "exceeds the attached capacity"),
        ("adalora:budget=3", "adalora", "below one rank for each of the 4"),
        ("adalora:budget=8", "lora", "attach method 'adalora'"),
        ("adalora:budget=8,t_init=6,t_final=4", "adalora", "end after training ends"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, monkeypatch, spec, method, match):
    steps: list[int] = []
    monkeypatch.setattr(AdaLoraAllocator, "after_backward", lambda self, state: steps.append(state.step))
    with pytest.raises(ConfigError, match=match):
        _fit(tmp_path, spec, method=method)
    assert not steps


@pytest.mark.parametrize("spec", ["adalora:budget=0", "adalora:budget=8,delta_t=0", "adalora:budget=8,beta1=1.0"])
def test_bad_options_are_errors_when_the_config_is_built(spec):
    with pytest.raises(ConfigError):
        TrainConfig(steps=10, callbacks=(spec,))


def test_resuming_an_adalora_run_is_refused(tmp_path):
    """The scores and masks are not checkpointed: a resumed run says so instead of allocating from nothing."""
    model = lk.attach(tiny_llama(0), lk.method_config("adalora", r=4), targets=["q_proj", "v_proj"])
    cfg = TrainConfig(steps=6, batch_size=2, save_every=2, callbacks=("adalora:budget=8",))

    def crash(step: int, _: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, records(), cfg, out_dir=tmp_path, pad_id=0, progress=False, on_step=crash)
    assert (tmp_path / "checkpoint.pt").is_file()
    with pytest.raises(ConfigError, match="without --resume"):
        train(model, records(), cfg, out_dir=tmp_path, pad_id=0, progress=False, resume=True)
