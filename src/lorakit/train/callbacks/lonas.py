"""lonas: LoNAS, Search for Efficient Low-Rank Adapters (LoRA + NAS) — https://arxiv.org/abs/2401.01286

Weight-sharing super-adapter: every optimizer step samples a sub-adapter config c (per module a rank c_m from the
elastic set ``ranks``, a pure function of (seed, step)) and trains only its nested slice,
h = W₀x + (α/c_m)·B[:, :c_m]·A[:c_m]·x; components past c_m are left exactly as they were. After training,
``search(model, evaluate, budget, ranks)`` returns the config with the best score among the heuristic sub-adapter
(middle ranks) and seeded random / mutated samples whose trainable parameters Σ c_m·(d_in + d_out) fit ``budget``,
and ``extract(model_or_dir, config, out)`` writes it as a standard PEFT LoRA (``rank_pattern``, same lora_alpha)
whose outputs equal the super-adapter run at c. With ``budget=`` the callback runs that search itself at the end
(score: loss on the run's last ``eval_batches`` training micro-batches) and leaves the model as the sub-adapter,
so the run saves it.

Not built: LoNAS's elastic widths of the base model's layers (we search adapter ranks only, as Shears does) and
its latency budgets (the budget is a parameter count).
"""

from __future__ import annotations

from lorakit.train.callbacks._api import register_callback
from lorakit.train.callbacks._elastic import ElasticLora, extract, sample_config, search, use_config

__all__ = ["LoNAS", "extract", "sample_config", "search", "use_config"]


@register_callback(
    "lonas",
    help="LoNAS: trains lora adapters as a weight-sharing super-adapter over elastic ranks (e.g. ranks=2|4|8); "
    "with budget= (parameters) searches the best sub-adapter within it at the end. Options: ranks, budget, "
    "samples, eval_batches.",
)
class LoNAS(ElasticLora):
    name = "lonas"
