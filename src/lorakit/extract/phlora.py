"""PHLoRA: post-hoc LoRA extraction from a full fine-tune — https://arxiv.org/abs/2509.10971
Rule: ΔW = W_tuned − W_base per targeted layer; keep its top-k SVD (B = U_k S_k, A = V_kᵀ), with k
from a fixed rank, a rank ratio, or the smallest k keeping a fraction E of Σσ² (energy).

Streaming: both checkpoints are read one module at a time and the adapter is written as it is
made (io/stream.py), so memory holds a few tensors whatever the model size. Reading (with the
finiteness and equality checks) runs a module or two ahead in one thread and writing trails in
another (extract/pipeline.py), so both overlap the SVDs; the output is byte for byte what one
loop writes (the SVDs stay in order on the main thread). Differences that are not a targeted
weight (norms, embeddings, heads, biases) are saved whole as PEFT ``modules_to_save`` — or, for
embeddings with ``embeddings="lora"``, factored too — and listed in the report; unchanged tensors
are skipped. Also the RE-Adapt / LoRE-Adapt use (#157): extract
instruct − base once, then apply it to another fine-tune of the same base.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lorakit.errors import CheckpointError, ConfigError
from lorakit.extract.checkpoint import Checkpoint
from lorakit.extract.lowrank import SVD_METHODS, Decomposition, RankRule, decompose
from lorakit.extract.pipeline import BackgroundWriter, Prefetch
from lorakit.extract.plan import Plan, plan_modules
from lorakit.extract.report import PlotJob
from lorakit.io.atomic import atomic_dir
from lorakit.io.peft_format import (
    CONFIG_NAME,
    EMBEDDING_KEYS,
    LINEAR_KEYS,
    PREFIX,
    WEIGHTS_NAME,
    lora_config,
    lorakit_block,
)
from lorakit.io.stream import SafetensorsWriter, header_room

REPORT_NAME = "extract_report.json"
PLOT_NAME = "extract_energy.png"
_Tensors = dict[str, torch.Tensor]  # tensor name -> tensor, of one module
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExtractResult:
    """What was extracted: per-module rank/energy/error, whole-saved modules, and totals."""

    path: Path
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    saved: dict[str, str] = field(default_factory=dict)  # module -> why it was saved whole
    unchanged: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    spectra: dict[str, list[float]] = field(default_factory=dict)  # module -> leading σ² / ‖ΔW‖², for the plot

    def to_json(self) -> dict[str, Any]:
        errors = [m["rel_error"] for m in self.modules.values()]
        return {
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
            "summary": {
                "lora_modules": len(self.modules),
                "saved_modules": len(self.saved),
                "unchanged_tensors": self.unchanged,
                "lora_params": sum(m["params"] for m in self.modules.values()),
                "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
                "max_rel_error": max(errors, default=0.0),
                "mean_energy": sum(m["energy"] for m in self.modules.values()) / max(1, len(self.modules)),
            },
            "modules": self.modules,
            "saved": self.saved,
        }


# Elements per chunk of the reader thread's checks: below torch's parallel grain (32,768), so each op
# runs on the reader alone. A second OpenMP team beside the main thread's would stall its small
# QRs and matmuls whenever the cores are all busy (on 2 cores, 10x slower in whole runs).
SERIAL = 16384


def _chunks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return t.reshape(-1).split(SERIAL)


def _finite(t: torch.Tensor) -> bool:
    """All values finite. One reduction per chunk first (NaN/inf propagate); the exact check only if it says no."""
    return all(bool(torch.isfinite(c.sum())) or bool(torch.isfinite(c).all()) for c in _chunks(t))


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal(a, b)``, chunk by chunk (it stops at the first chunk that differs)."""
    return a.shape == b.shape and all(torch.equal(x, y) for x, y in zip(_chunks(a), _chunks(b), strict=True))


def _orient(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """A weight-layout delta as the (out, in) map: Conv1D (in, out) and Embedding (vocab, d) are transposed."""
    return delta if kind == "linear" else delta.T


def extract(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    ratio: float | None = None,
    max_rank: int | None = None,
    targets: str | Sequence[str] = "all-linear",
    exclude: str | Sequence[str] | None = None,
    svd: str = "auto",
    dtype: str | None = None,
    embeddings: str = "full",
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    plot: bool = True,
) -> ExtractResult:
    """Extract ``tuned − base`` as a PEFT LoRA dir at ``out`` (plus extract_report.json and a PNG)."""
    if rank is None and energy is None and ratio is None and max_rank is None:
        rank = 16
    rule = RankRule(rank=rank, energy=energy, ratio=ratio, max_rank=max_rank)
    if svd not in SVD_METHODS:
        raise ConfigError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}.")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if embeddings not in ("full", "lora"):
        raise ConfigError(f"embeddings must be 'full' (modules_to_save) or 'lora', got {embeddings!r}.")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists; choose a new folder or pass overwrite=True (--overwrite).")
    started = time.perf_counter()
    b, t = Checkpoint(base), Checkpoint(tuned)
    plan = plan_modules(b, t, targets, exclude, lora_embeddings=embeddings == "lora")
    result = ExtractResult(out)
    result.settings = {
        "base": str(b.path),
        "tuned": str(t.path),
        "rule": {k: v for k, v in vars(rule).items() if v is not None},
        "svd": svd,
        "embeddings": embeddings,
        "dtype": dtype or "as stored",
    }
    room = header_room(3 * sum(map(len, plan.keys.values())) + 8, 300 * len(plan.modules) + 8192)
    with (
        atomic_dir(out, marker=CONFIG_NAME) as tmp,
        PlotJob(plot, tmp / PLOT_NAME) as plotter,  # a helper process draws it meanwhile
        SafetensorsWriter(tmp / WEIGHTS_NAME, room) as file,
        BackgroundWriter(file) as writer,
    ):
        run = _Run(plan, rule, svd, dtype, seed, writer, plotter)
        run(b, t, result, progress)
        plotter.finish(result)
        writer.finish()
        ranks, kinds, fingerprint = run.ranks, run.kinds, run.fingerprint
        config = lora_config(ranks, kinds, list(result.saved), b.config.get("_name_or_path"), plan.task_type)
        config["lora_bias"] = plan.lora_bias
        block = lorakit_block(list(ranks), fingerprint, {"made_by": "lorakit extract", **result.settings})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        file.close({"format": "pt", "lorakit": json.dumps(block)})
        result.seconds = time.perf_counter() - started
        (tmp / REPORT_NAME).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        plotter.wait()
    return result


class _Run:
    """One pass over the planned modules: read both sides, factor or save whole, write as it goes."""

    def __init__(
        self,
        plan: Plan,
        rule: RankRule,
        svd: str,
        dtype: str | None,
        seed: int,
        writer: BackgroundWriter,
        plot: PlotJob,
    ):
        self.plan, self.rule, self.svd, self.writer, self.plot = plan, rule, svd, writer, plot
        self.cast = DTYPES[dtype] if dtype else None
        self.generator = torch.Generator().manual_seed(seed)
        self.ranks: dict[str, int] = {}
        self.kinds: dict[str, str] = {}
        self.fingerprint: dict[str, float] = {}

    def read(self, b: Checkpoint, t: Checkpoint) -> Iterator[tuple[str, _Tensors, _Tensors, list[str]]]:
        """Per module, in file order: its base and tuned tensors and the names of those that changed."""
        for module in self.plan.modules:
            keys = self.plan.keys[module]
            base_t = {k: b.get(k, None) for k in keys}
            tuned_t = {k: t.get(k, None) for k in keys}
            for k, v in tuned_t.items():
                if v.is_floating_point() and not _finite(v):
                    raise CheckpointError(f"{t.path}: tensor {k} has NaN or infinite values; the fine-tune is broken.")
            yield module, base_t, tuned_t, [k for k in keys if not _equal(base_t[k], tuned_t[k])]

    def __call__(self, b: Checkpoint, t: Checkpoint, result: ExtractResult, progress: bool) -> None:
        with Prefetch(self.read(b, t), ahead=1) as modules:
            bar = tqdm(
                modules, total=len(self.plan.modules), desc="extract", unit="module", disable=not progress, leave=False
            )
            for module, base_t, tuned_t, changed in bar:
                self.step(module, base_t, tuned_t, changed, result, bar)

    def step(
        self, module: str, base_t: _Tensors, tuned_t: _Tensors, changed: list[str], result: ExtractResult, bar: Any
    ) -> None:
        """Factor one module's change, or save it whole; unchanged tensors are only counted."""
        keys = self.plan.keys[module]
        kind = self.plan.lora.get(module)
        if kind and len(self.fingerprint) < 4 and f"{module}.weight" in base_t:
            self.fingerprint[module] = float(base_t[f"{module}.weight"].float().norm())
        result.unchanged += len(keys) - len(changed)
        if changed and kind and set(changed) <= {f"{module}.weight", f"{module}.bias"}:
            d = self.factor(module, kind, base_t, tuned_t, result)
            bar.set_postfix(rank=d.rank, energy=f"{d.energy:.3f}")
            self.plot.update(result)
        elif changed:
            self.save_whole(module, tuned_t, result)

    def factor(
        self, module: str, kind: str, base_t: dict[str, torch.Tensor], tuned_t: dict[str, torch.Tensor], result: Any
    ) -> Decomposition:
        weight = f"{module}.weight"
        delta = _orient(tuned_t[weight].float() - base_t[weight].float(), kind)
        d = decompose(delta, self.rule, self.svd, self.generator)
        store = self.cast or base_t[weight].dtype
        for name, (A, B), k in _lora_outputs(module, kind, d, self.plan.tied_head):
            keys = EMBEDDING_KEYS if k == "embedding" else LINEAR_KEYS
            self.writer.add(f"{PREFIX}{name}.{keys[0]}", A.to(store))
            self.writer.add(f"{PREFIX}{name}.{keys[1]}", B.to(store))
            self.ranks[name], self.kinds[name] = d.rank, k
            result.modules[name] = _module_report(d, delta.shape)
        if self.plan.lora_bias:  # lora_B.bias = the bias change (zero where the module has none)
            shift = _bias_shift(base_t, tuned_t, module, delta.shape[0])
            self.writer.add(f"{PREFIX}{module}.lora_B.bias", shift.to(store))
        if d.total > 0:
            result.spectra[module] = (d.singular_values[:256].double().square() / d.total).tolist()
        return d

    def save_whole(self, module: str, tuned_t: dict[str, torch.Tensor], result: ExtractResult) -> None:
        for name in _saved_names(module, self.plan.tied_head):
            for k, v in tuned_t.items():
                self.writer.add(f"{PREFIX}{name}.{k[len(module) + 1 :]}", v.to(self.cast) if self.cast else v)
            result.saved[name] = "changed, not a LoRA target" if name == module else f"tied to {module}, which changed"


def _bias_shift(
    base_t: dict[str, torch.Tensor], tuned_t: dict[str, torch.Tensor], module: str, out: int
) -> torch.Tensor:
    key = f"{module}.bias"
    return tuned_t[key].float() - base_t[key].float() if key in base_t else torch.zeros(out)


def _module_report(d: Decomposition, shape: torch.Size) -> dict[str, Any]:
    return {
        "rank": d.rank,
        "full_rank": d.full_rank,
        "energy": d.energy,
        "rel_error": d.rel_error,
        "params": d.rank * (shape[0] + shape[1]),
        "svd": d.method,
    }


def _lora_outputs(
    module: str, kind: str, d: Decomposition, tied_head: tuple[str, str] | None
) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor], str]]:
    """(module, (A, B), kind) to write; a changed embedding tied to the head also adapts the head."""
    outputs = [(module, (d.A, d.B), kind)]
    if tied_head and tied_head[0] == module:  # head weight = embedding weight: head ΔW (vocab, d) = (B·A)ᵀ
        outputs.append((tied_head[1], (d.B.T.contiguous(), d.A.T.contiguous()), "linear"))
    return outputs


def _saved_names(module: str, tied_head: tuple[str, str] | None) -> list[str]:
    """Names to save a changed module under; a tied embedding is saved for the head as well."""
    return [module, tied_head[1]] if tied_head and tied_head[0] == module else [module]
