"""adapter_steps (always on): every active adapter's set_step gets the optimizer step at each step's begin,
so SingLoRA's ramp u(t) follows optimizer steps with gradient accumulation, not micro-batches."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.testing import tiny_llama
from lorakit.train.callbacks import CALLBACKS, Callback, register_callback
from lorakit.train.data import Record
from lorakit.train.loop import TrainConfig, train


@pytest.fixture
def ramp_probe():
    """A callback 'ramp_probe' recording, per hook, every SingLoRA adapter's step counter t."""

    @register_callback("ramp_probe", help="Record SingLoRA's step counters (test).")
    class RampProbe(Callback):
        seen: dict[str, list[set[int]]] = {"begin": [], "end": []}

        def on_step_begin(self, state):
            self.seen["begin"].append({int(w.adapters[w.active].step) for _, w in wrappers(state.model)})

        def on_step_end(self, state):
            self.seen["end"].append({int(w.adapters[w.active].step) for _, w in wrappers(state.model)})

    yield RampProbe.seen
    CALLBACKS.pop("ramp_probe")


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_singlora_ramp_tracks_optimizer_steps(ramp_probe, grad_accum, tmp_path):
    model = tiny_llama()
    lk.attach(model, lk.method_config("singlora", r=2, ramp_steps=10), targets=["q_proj", "v_proj"])
    calls = []
    for _, w in wrappers(model):
        adapter = w.adapters[w.active]
        adapter.set_step = lambda t, adapter=adapter: (calls.append(t), type(adapter).set_step(adapter, t))
    recs = [Record(ids, ids) for ids in torch.randint(4, 256, (8, 10), generator=torch.Generator()).tolist()]
    cfg = TrainConfig(steps=4, batch_size=2, grad_accum=grad_accum, callbacks=("ramp_probe",))
    train(model, recs, cfg, out_dir=tmp_path, pad_id=0, progress=False)
    n_layers = len(list(wrappers(model)))
    assert calls == [k for k in range(4) for _ in range(n_layers)]  # each step's begin: set_step(step)
    assert ramp_probe["begin"] == [{k} for k in range(4)]  # the probe runs after adapter_steps
    # within a step SingLoRA still counts its training forwards (one per micro-batch)
    assert ramp_probe["end"] == [{k + grad_accum} for k in range(4)]
