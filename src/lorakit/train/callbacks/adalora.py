"""adalora: AdaLoRA's rank allocator (https://arxiv.org/abs/2303.10512) for ``adalora`` adapters, PEFT's
``RankAllocator`` semantics. After every optimizer step k (``after_optimizer_step``, the gradients still there,
PEFT's documented ``optimizer.step(); update_and_allocate(k); zero_grad()``):

- while k < T − t_final: the sensitivity Ī·Ū of every element of P, Λ, Q is updated (EMA β₁, uncertainty β₂);
  a triplet's score is s(Λᵢ) + mean s(Qᵢ,:) + mean s(P:,ᵢ); every ``delta_t`` steps after ``t_init`` the
  triplets outside the global top-b(k) get Λᵢ = 0, b(k) the cubic schedule from the attached total rank down
  to ``budget`` (T = the run's steps);
- at k = T − t_final the final allocation keeps exactly ``budget`` triplets; after it, the same Λᵢ stay 0.

At the end of training the masked triplets are removed (rank surgery, train/callbacks/_rank.py): each adapter
is rebuilt at its kept rank, so the saved dir holds smaller tensors and PEFT's ``rank_pattern`` and the outputs
are unchanged (the removed triplets had Λᵢ = 0). The orthogonality regulariser is the method's (its
``orth_reg_weight``), added to the loss by the loop. Bad budgets and schedules are ConfigErrors before the
first step. The scores and masks live in the callback, not in checkpoints: resuming is refused.
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError
from lorakit.methods.lowrank.adalora import AdaLora
from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback
from lorakit.train.callbacks._rank import cubic_budget, keep_components, top_k


@register_callback(
    "adalora", help="AdaLoRA rank allocation for 'adalora' adapters: budget= total rank at the end (PEFT's semantics)."
)
class AdaLoraAllocator(RankAllocator):
    name = "adalora"
    method = AdaLora

    def __init__(
        self,
        budget: int,
        t_init: int = 0,
        t_final: int = 0,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ):
        """``budget``: total rank over all adapted modules at the end (PEFT's target_r × modules); ``t_init`` /
        ``t_final``: steps before / after the budget falls; ``delta_t``: steps between allocations."""
        super().__init__(budget, beta1, beta2)
        check_ints(self.name, low=0, t_init=t_init, t_final=t_final)
        check_ints(self.name, delta_t=delta_t)
        self.t_init, self.t_final, self.delta_t = t_init, t_final, delta_t
        self.initial = 0  # the attached total rank, set by the check
        self.masks: dict[str, torch.Tensor] = {}  # module -> kept triplets (bool, (r,))

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        super().check_budget(layers, steps)
        if self.t_init + self.t_final >= steps:
            raise ConfigError(
                f"adalora: t_init + t_final = {self.t_init + self.t_final} leaves no step of the {steps}-step run to "
                "lower the budget in; the schedule would end after training ends. Lower them or raise steps."
            )
        self.initial = self.total_rank(layers)

    def after_optimizer_step(self, state: TrainState) -> None:
        step, end = state.step, self.steps - self.t_final
        adapters = self.layers(state.model)
        if step < end:
            for name, _, a in adapters:
                for key, p in (("Q", a.Q), ("E", a.E), ("P", a.P)):
                    self.sensitivity.update(f"{name}.{key}", p.detach(), p.grad)
            if step > self.t_init and step % self.delta_t == 0:
                ends = {"t_init": self.t_init, "t_final": self.t_final, "total": self.steps}
                self.allocate(adapters, cubic_budget(step, initial=self.initial, final=self.budget, **ends))
        elif step == end:
            self.allocate(adapters, self.budget)
            self.sensitivity.reset()
        else:
            self.apply(adapters)

    def allocate(self, adapters: list[Layer], budget: int) -> None:
        """Keep the ``budget`` best-scoring triplets over all modules; Λ of the others := 0."""
        s = self.sensitivity.score
        scores = {
            name: s(f"{name}.E").view(-1) + s(f"{name}.Q").mean(dim=1) + s(f"{name}.P").mean(dim=0)  # (r,)
            for name, _, _ in adapters
        }
        self.masks = top_k(scores, budget)
        self.apply(adapters)

    @torch.no_grad()
    def apply(self, adapters: list[Layer]) -> None:
        for name, _, a in adapters:
            a.E.masked_fill_(~self.masks[name].view(-1, 1), 0.0)

    def on_end(self, state: TrainState) -> None:
        """Rank surgery: every adapter rebuilt with its kept triplets only (their Λ unchanged, the rest were 0)."""
        if not self.masks:
            return
        for name, wrapper, a in self.layers(state.model):
            keep = self.masks[name].nonzero().view(-1)
            if keep.numel() < a.config.r:
                new = keep_components(a, wrapper.base_layer, keep, state.optimizer)
                wrapper.adapters[str(wrapper.active)] = new
