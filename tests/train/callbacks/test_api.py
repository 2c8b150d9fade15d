"""Training callbacks: a registered callback sees every hook in order with the step numbers and
metrics of the docstring in callbacks/_api.py; names are checked against the registry."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.testing import tiny_llama
from lorakit.train.callbacks import CALLBACKS, Callback, register_callback
from lorakit.train.data import Record
from lorakit.train.loop import TrainConfig, train


def records(n: int = 8) -> list[Record]:
    g = torch.Generator().manual_seed(0)
    return [Record(ids, ids) for ids in torch.randint(4, 256, (n, 10), generator=g).tolist()]


def lora_model() -> torch.nn.Module:
    model = tiny_llama()
    lk.attach(model, lk.method_config("lora", r=2), targets=["q_proj"])
    return model


@pytest.fixture
def recorder():
    """A callback class registered as 'recorder' for one test; every hook appends to ``events``."""

    @register_callback("recorder", help="Record every hook call (test).")
    class Recorder(Callback):
        events: list[tuple] = []
        states: list = []

        def on_step_begin(self, state):
            self.events.append(("on_step_begin", state.step, sorted(state.metrics)))
            self.states.append(state)

        def after_backward(self, state):
            grads = [p.grad for p in state.model.parameters() if p.requires_grad]
            assert all(g is not None for g in grads)  # every micro-batch's gradient is there
            self.events.append(("after_backward", state.step, sorted(state.metrics)))

        def after_optimizer_step(self, state):
            grads = [p.grad for p in state.model.parameters() if p.requires_grad]
            assert all(g is not None for g in grads)  # stepped, not yet zeroed
            assert state.optimizer.state  # the optimizer has stepped
            self.events.append(("after_optimizer_step", state.step, sorted(state.metrics)))

        def on_step_end(self, state):
            assert all(p.grad is None for p in state.model.parameters())  # the step is done
            self.events.append(("on_step_end", state.step, sorted(state.metrics)))

        def on_save(self, state, path):
            assert path.is_file()
            self.events.append(("on_save", state.step, path.name))

        def on_end(self, state):
            self.events.append(("on_end", state.step, sorted(state.metrics)))

    yield Recorder
    CALLBACKS.pop("recorder")


def test_a_registered_callback_sees_every_hook_in_order(recorder, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=4, grad_accum=2, save_every=2, callbacks=("recorder",))
    model = lora_model()
    train(model, records(), cfg, out_dir=tmp_path, pad_id=0, progress=False)
    after = ["loss", "lr", "tokens"]
    end = ["loss", "lr", "tokens", "tokens_per_s"]
    expected = []
    for k in range(4):  # step k+1: k optimizer steps done at its begin, k+1 at its end
        expected += [("on_step_begin", k, []), ("after_backward", k, after), ("after_optimizer_step", k + 1, after)]
        expected.append(("on_step_end", k + 1, end))
        if k + 1 == 2:
            expected.append(("on_save", 2, "checkpoint.pt"))
    expected.append(("on_end", 4, end))
    assert recorder.events == expected
    state = recorder.states[0]
    assert all(s is state for s in recorder.states)  # one state, updated as the run goes
    assert state.model is model and state.config is cfg
    assert {id(p) for g in state.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert state.scheduler.last_epoch == 4


def test_callbacks_run_in_the_configured_order_after_the_always_on_ones(recorder, tmp_path):
    order = []

    @register_callback("second", help="test")
    class Second(Callback):
        def on_step_begin(self, state):
            order.append("second")

    recorder.on_step_begin = lambda self, state: order.append("recorder")
    try:
        cfg = TrainConfig(steps=1, batch_size=4, callbacks=("second", "recorder", "second"))
        train(lora_model(), records(), cfg, out_dir=tmp_path, pad_id=0, progress=False)
    finally:
        CALLBACKS.pop("second")
    assert order == ["second", "recorder"]  # a name given twice runs once


def test_unknown_callback_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown callback 'adapter_step'\. Did you mean 'adapter_steps'") as e:
        TrainConfig(callbacks=("adapter_step",))
    assert "Registered callbacks: " + ", ".join(sorted(CALLBACKS)) in str(e.value)


def test_callbacks_from_a_yaml_list_or_a_single_name_become_a_tuple():
    assert TrainConfig(callbacks=["adapter_steps"]).callbacks == ("adapter_steps",)  # type: ignore[arg-type]
    assert TrainConfig(callbacks="adapter_steps").callbacks == ("adapter_steps",)  # type: ignore[arg-type]
    assert TrainConfig().callbacks == ()


def test_registering_a_non_callback_or_a_taken_name_fails():
    with pytest.raises(TypeError, match="must subclass"):
        register_callback("bad", help="")(dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered twice"):
        register_callback("adapter_steps", help="")(type("Other", (Callback,), {}))
    assert "bad" not in CALLBACKS


def test_a_callback_takes_options_as_name_colon_key_values(tmp_path):
    """``NAME:KEY=VALUE,...`` builds the class with those keyword arguments (YAML scalars); a wrong key is
    a clear error before training, naming what the callback takes."""
    seen: list[dict] = []

    @register_callback("budgeted", help="Takes options (test).")
    class Budgeted(Callback):
        def __init__(self, budget: int = 1, warm_up: float = 0.0, name: str = "x"):
            seen.append({"budget": budget, "warm_up": warm_up, "name": name})

    try:
        cfg = TrainConfig(steps=1, batch_size=2, callbacks=("budgeted:budget=64,warm-up=0.5, name=abc",))
        train(lora_model(), records(), cfg, out_dir=tmp_path, pad_id=0, progress=False)
        assert seen[-1] == {"budget": 64, "warm_up": 0.5, "name": "abc"}
        with pytest.raises(ConfigError, match=r"callback 'budgeted' got budgt option\(s\); it takes: budget, warm_up"):
            TrainConfig(callbacks=("budgeted:budgt=3",))
        with pytest.raises(ConfigError, match="expected NAME:KEY=VALUE"):
            TrainConfig(callbacks=("budgeted:64",))
    finally:
        CALLBACKS.pop("budgeted")
