"""adapter_steps: every active adapter learns the optimizer step at each step's begin (``set_step``).

Always on (the loop adds it): schedules inside adapters, like SingLoRA's ramp u(t), follow optimizer
steps rather than forwards, so they hold with gradient accumulation and after a resume.
"""

from __future__ import annotations

from lorakit.inject import active_layers
from lorakit.train.callbacks._api import Callback, TrainState, register_callback


@register_callback("adapter_steps", help="Tell every active adapter the optimizer step (always on).")
class AdapterSteps(Callback):
    def on_step_begin(self, state: TrainState) -> None:
        for _, _, adapter in active_layers(state.model):
            adapter.set_step(state.step)
