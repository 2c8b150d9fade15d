"""Rehearsal-free continual learning with PEARL (https://arxiv.org/abs/2505.11998): one ``lora`` adapter per task,
trained in order on that task's records only, its ranks set by the ``pearl`` callback from the distance of its
update to the previous task's adapter (the first task: to the base weights). Each task's adapter is written to
its own dir and never opened for writing again, so earlier tasks keep their exact files (and their outputs).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from lorakit.errors import ConfigError
from lorakit.inject import active_layers, attach
from lorakit.io.adapter import save_adapter
from lorakit.methods import method_config
from lorakit.train.data import Record
from lorakit.train.loop import TrainConfig, train


@dataclass
class TaskResult:
    """What one task's run left: its adapter dir, the per-module ranks and the distances that set them."""

    path: Path
    ranks: dict[str, int]
    distances: dict[str, float]
    losses: list[float]


def continual(
    base: nn.Module,
    tasks: Sequence[Sequence[Record]],
    *,
    out_dir: str | Path,
    budget: int,
    r: int = 8,
    alpha: float | None = None,
    probe: int = 5,
    r_min: int = 1,
    targets: str | list[str] = "all-linear",
    config: TrainConfig | None = None,
    pad_id: int = 0,
    progress: bool = False,
) -> list[TaskResult]:
    """Train one PEARL adapter per task in ``tasks`` (each a list of records), in order, on a fresh copy of
    ``base`` (never changed): task t attaches ``lora`` at rank ``r`` on ``targets``, trains on its own records
    with ``pearl:budget=budget,probe=probe,r_min=r_min,reference=<task t−1's dir>`` and saves to
    ``out_dir/task_<t>``. ``config`` gives steps, lr, seed, ... (its callbacks are kept, pearl is added)."""
    if not tasks or any(not t for t in tasks):
        raise ConfigError("continual: give at least one task, each with at least one record.")
    out = Path(out_dir)
    cfg = config or TrainConfig()
    if any(c.split(":")[0].strip() == "pearl" for c in cfg.callbacks):
        raise ConfigError("continual: config already names the pearl callback; continual adds it per task.")
    dirs = [out / f"task_{t}" for t in range(len(tasks))]
    if taken := [str(d) for d in dirs if d.exists()]:
        raise ConfigError(
            f"continual: {', '.join(taken)} already exist; earlier adapters are never overwritten, "
            "so pick a new out_dir."
        )
    if "," in str(out):
        raise ConfigError(f"continual: out_dir {str(out)!r} contains a comma, which a callback option cannot hold.")
    method = method_config("lora", r=r, alpha=float(alpha if alpha is not None else r))
    results: list[TaskResult] = []
    for t, records in enumerate(tasks):
        report = out / f"run_{t}" / "pearl.json"
        reference = f",reference={dirs[t - 1]}" if t else ""
        spec = f"pearl:budget={budget},probe={probe},r_min={r_min},report={report}{reference}"
        model = attach(copy.deepcopy(base), method, targets=targets)
        task_cfg = replace(cfg, callbacks=(*cfg.callbacks, spec))
        result = train(model, list(records), task_cfg, out_dir=out / f"run_{t}", pad_id=pad_id, progress=progress)
        save_adapter(model.eval(), dirs[t])
        ranks = {name: int(a.config.r) for name, _, a in active_layers(model)}
        results.append(TaskResult(dirs[t], ranks, json.loads(report.read_text())["distances"], result.losses))
    return results
