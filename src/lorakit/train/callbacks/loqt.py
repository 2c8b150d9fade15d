"""loqt: LoQT's periodic merge (methods/lowrank/loqt.py) — after every ``merge_every``-th optimizer step, each active
LoQT adapter folds s·P·B into its base weight (a quantized base is quantized again), B restarts at 0 and its
optimizer state (AdamW's moments of the old B) is dropped.

A training callback rather than the adapter's ``set_step`` hook: the merge writes the base layer, which the
wrapper owns and ``set_step`` never sees, and it resets optimizer state, which only :class:`TrainState` holds.
"""

from __future__ import annotations

from lorakit.inject import wrappers
from lorakit.methods.lowrank.loqt import Loqt
from lorakit.train.callbacks._api import Callback, TrainState, register_callback


@register_callback(
    "loqt", help="LoQT: every merge_every steps fold each loqt adapter's P·B into its base, B restarts at 0."
)
class LoqtMerge(Callback):
    def on_step_end(self, state: TrainState) -> None:
        for _, w in wrappers(state.model):
            adapter = w.adapters[w.active] if w.active is not None and w.active in w.adapters else None
            if isinstance(adapter, Loqt) and state.step % adapter.config.merge_every == 0:
                adapter.fold(w.base_layer)
                state.optimizer.state.pop(adapter.B, None)  # fresh moments for the restarted B
