"""Export adapters as plain-LoRA PEFT dirs that vLLM's LoRA loader takes (``vllm serve --enable-lora``).

Inputs and how each becomes a scale-1 LoRA (ΔW = B·A per module):

- a plain LoRA dir: read as factors and re-written (scale folded into B, per-module ranks);
- any other registered method (DoRA, VeRA, ...): loaded onto its base and converted module by module
  with the adapter's ``to_lora(base, rank)`` (exact for VeRA; DoRA's is the best rank-2r — or ``rank`` —
  approximation of its exact merged delta, see ``methods/dora.py``);
- a compressed collection (``lorakit compress``): one dir per adapter, B = U·cores[c], A = Vᵀ.

What vLLM accepts, from its source (``vllm/lora/peft_helper.py``: PEFTHelper, ``vllm/lora/lora_model.py``:
LoRAModel.from_local_checkpoint, ``vllm/lora/utils.py``: parse_fine_tuned_lora_name) is written as
:func:`vllm_problems`, which every exported dir must pass:

- ``peft_type`` LORA with the required fields ``r``, ``lora_alpha`` and ``target_modules``;
- no ``use_dora``, no ``modules_to_save`` (older vLLM: none at all; newest: classifier/score only),
  ``bias`` "none" and no ``lora_bias``, no residual init (PiSSA, OLoRA, CorDA, LoftQ), no
  layer_replication / aLoRA / BD-LoRA / QALoRA;
- every tensor key ends in ``lora_A.weight``, ``lora_B.weight``, ``lora_embedding_A`` or
  ``lora_embedding_B`` (or is a base embedding copy vLLM skips), in A/B pairs of matching rank;
- every module's scale is the same whether read with one global ``lora_alpha/r`` (vLLM before
  rank_pattern support) or per module through rank_pattern/alpha_pattern (PEFT, newer vLLM);
- the largest rank ≤ ``max(r, rank_pattern)`` and ≤ 512, vLLM's largest ``--max-lora-rank``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import torch
from torch import nn

from lorakit.errors import AdapterFormatError, BaseModelError, ConfigError, LorakitError
from lorakit.io.adapter import CONFIG_NAME, PREFIX, RESIDUAL_INITS, WEIGHTS_NAME, read_config
from lorakit.io.atomic import atomic_dir
from lorakit.io.collection import Collection, check_names, is_collection
from lorakit.io.factors import AdapterFactors, read_factors, write_factors
from lorakit.io.peft_format import adapter_method, is_plain_lora, lora_scale, pattern_value
from lorakit.lowrank import LoraFactors, truncate

if TYPE_CHECKING:
    from lorakit.methods._api import AdapterModule


FORMATS = ("vllm",)
MANIFEST = "lorakit-export.json"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora MaxLoRARanks
VLLM_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
VLLM_SKIPPED = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")  # is_base_embedding_weights
UNSUPPORTED = ("layer_replication", "alora_invocation_tokens", "use_bdlora", "use_qalora")


@dataclass
class ExportReport:
    """Where each adapter went, the rank vLLM must allow, and what was dropped or needs care."""

    out: Path
    adapters: dict[str, Path]  # name -> exported dir
    methods: dict[str, str]  # name -> source method ("lora", "dora", "collection", ...)
    max_rank: int
    warnings: list[str] = field(default_factory=list)

    @property
    def max_lora_rank(self) -> int:
        """The smallest value vLLM accepts for ``--max-lora-rank`` that fits every exported adapter."""
        return next(r for r in VLLM_MAX_LORA_RANKS if r >= self.max_rank)

    def command(self, base: str = "BASE") -> str:
        mods = " ".join(f"{n}={p}" for n, p in self.adapters.items())
        return f"vllm serve {base} --enable-lora --lora-modules {mods} --max-lora-rank {self.max_lora_rank}"


def _config_problems(fields: dict[str, Any]) -> list[str]:
    problems = []
    if fields.get("peft_type") != "LORA":
        problems.append(f"peft_type is {fields.get('peft_type')!r}; vLLM loads only LORA.")
    problems += [
        f"the required field {k!r} is missing." for k in ("r", "lora_alpha", "target_modules") if k not in fields
    ]
    r = fields.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r must be a positive integer, got {r!r}.")
    if fields.get("use_dora"):
        problems.append("use_dora is true; vLLM does not support DoRA.")
    if fields.get("use_qalora"):
        problems.append("use_qalora is true; vLLM does not support QA-LoRA's pooled inputs (export converts it).")
    if fields.get("modules_to_save"):
        problems.append(f"modules_to_save is {fields['modules_to_save']!r}; vLLM needs it to be None.")
    if fields.get("bias", "none") != "none" or fields.get("lora_bias"):
        problems.append("the adapter has a bias (bias / lora_bias); vLLM does not support adapter biases.")
    init = fields.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        problems.append(f"init_lora_weights={init!r} rewrites the base weights; vLLM does not support it.")
    problems += [f"{k} is set; vLLM does not support it." for k in UNSUPPORTED if fields.get(k)]
    return problems


def _factor_ranks(shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], dict[str, dict[str, int]]]:
    """(problems, module -> {"A": rank, "B": rank}) from the weights' keys and shapes, as vLLM parses them."""
    problems: list[str] = []
    ranks: dict[str, dict[str, int]] = {}
    for key, shape in shapes.items():
        tail = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        suffix = next((s for s in VLLM_SUFFIXES if tail.endswith("." + s)), None)
        if suffix is None:
            if not key.endswith(VLLM_SKIPPED):
                problems.append(f"tensor {key!r} is not a LoRA factor vLLM can parse.")
            continue
        module, is_a = tail[: -len(suffix) - 1], suffix in ("lora_A.weight", "lora_embedding_A")
        ranks.setdefault(module, {})["A" if is_a else "B"] = shape[0] if is_a else shape[-1]
    return problems, ranks


def _tensor_problems(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    problems, ranks = _factor_ranks(shapes)
    r, alpha, rslora = fields.get("r"), fields.get("lora_alpha"), bool(fields.get("use_rslora"))
    if not isinstance(r, int) or not isinstance(alpha, (int, float)) or r < 1:
        return problems
    global_scale = alpha / (math.sqrt(r) if rslora else r)  # what vLLM without rank_pattern support applies
    targets = fields.get("target_modules")
    for module, got in sorted(ranks.items()):
        if set(got) != {"A", "B"} or got["A"] != got["B"]:
            problems.append(f"{module}: the LoRA A and B factors do not pair up (ranks {got}).")
            continue
        rank = pattern_value(fields.get("rank_pattern"), module) or r
        scale = lora_scale(fields, module, rank)
        if rank != got["A"]:
            problems.append(f"{module}: rank {got['A']} in the weights but {rank} in the config.")
        if not math.isclose(scale, global_scale, rel_tol=1e-6):
            problems.append(
                f"{module}: scale {scale:g} (rank/alpha pattern) differs from the global lora_alpha/r = "
                f"{global_scale:g} that vLLM without rank_pattern support applies."
            )
        if isinstance(targets, list) and module.rsplit(".", 1)[-1] not in targets:
            problems.append(f"{module}: its name suffix is not in target_modules {targets}.")
    top = max([got.get("A", 0) for got in ranks.values()] or [0])
    if top > max([r, *(fields.get("rank_pattern") or {}).values()]) or top > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"rank {top} exceeds the config's r / rank_pattern or vLLM's largest max_lora_rank (512).")
    if not ranks:
        problems.append("the weights file holds no LoRA factors.")
    return problems


def vllm_problems(path: str | Path) -> list[str]:
    """Why vLLM's LoRA loader would refuse (or mis-scale) the adapter dir at ``path``; empty when it fits."""
    path = Path(path)
    fields = read_config(path)
    try:
        with safetensors.safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        return [f"{path / WEIGHTS_NAME} is missing or unreadable ({e})."]
    return _config_problems(fields) + _tensor_problems(fields, shapes)


class _Bases:
    """Base models for converting non-LoRA methods, loaded once per name (a given nn.Module is used as is)."""

    def __init__(self, base: str | Path | nn.Module | None):
        self.base = base
        self.cache: dict[str, nn.Module] = {}

    def get(self, fields: dict[str, Any], path: Path) -> nn.Module:
        if isinstance(self.base, nn.Module):
            return self.base
        from lorakit.models import MINILM_HUB_ID, SMOLLM2_HUB_ID, load_base

        hub = {SMOLLM2_HUB_ID: "smollm2-135m", MINILM_HUB_ID: "minilm-l6"}  # what the bundled bases record
        name = str(self.base or fields.get("base_model_name_or_path") or "smollm2-135m")
        name = hub.get(name, name)
        if name not in self.cache:
            try:
                self.cache[name] = load_base(name)[0]
            except BaseModelError as e:
                raise BaseModelError(
                    f"{path} ({adapter_method(fields)}) is converted to LoRA on its base model, and {name!r} cannot be "
                    f"loaded ({e}); pass the base with --base NAME|DIR (python: base=...)."
                ) from e
        return self.cache[name]


def _convert(path: Path, fields: dict[str, Any], model: nn.Module, rank: int | None) -> AdapterFactors:
    """Load a non-LoRA adapter onto ``model`` and express each module as LoRA with its ``to_lora``."""
    from lorakit import layers as L
    from lorakit.inject import delete_adapter, saved_modules, wrappers
    from lorakit.io.adapter import base_fingerprint, load_adapter

    name = "lorakit_export"
    load_adapter(model, path, name=name)
    try:
        factors, kinds = {}, {}
        for module, wrapper in wrappers(model):
            if name in wrapper.adapters:
                adapter: AdapterModule = wrapper.adapters[name]  # type: ignore[assignment]
                try:
                    with torch.no_grad():
                        f = adapter.to_lora(wrapper.base_layer, rank)
                except (NotImplementedError, LorakitError) as e:
                    raise AdapterFormatError(f"{path}: {module} cannot be expressed as LoRA: {e}") from e
                if f.A.shape[0] == 0:
                    continue  # a rank-0 module (AdaLoRA pruned all of it) adds nothing: plain LoRA leaves it out
                factors[module] = LoraFactors(f.A.detach().cpu().clone(), f.B.detach().cpu().clone(), float(f.scale))
                kinds[module] = L.layer_kind(wrapper.base_layer)
        saved = {
            m: {k: t.detach().cpu().clone() for k, t in h.copies[name].state_dict().items()}
            for m, h in saved_modules(model)
            if name in h.copies
        }
        fingerprint = base_fingerprint(model, list(factors))
    finally:
        delete_adapter(model, name)
    return AdapterFactors(
        factors, kinds, saved, fields.get("base_model_name_or_path"), fields.get("task_type"), fingerprint
    )


@dataclass
class _Item:
    name: str  # the exported dir's name
    method: str  # "lora", "dora", ..., or "collection"
    source: Path  # the input it came from
    adapter: AdapterFactors


def _sources(inputs: Sequence[str | Path], bases: _Bases, rank: int | None) -> list[_Item]:
    """Every adapter to export, in input order (a collection gives one per adapter in it)."""
    items: list[_Item] = []
    for p in map(Path, inputs):
        if is_collection(p):
            coll = Collection.load(p)
            items += [_Item(n, "collection", p, coll.factors(n)) for n in coll.names]
            continue
        fields = read_config(p)
        if fields.get("lora_bias"):
            raise AdapterFormatError(
                f"{p} has lora_bias (an output shift), which vLLM does not support and a plain LoRA cannot express; "
                "fold it into the base instead (lorakit merge --into-base)."
            )
        if is_plain_lora(fields):
            adapter = read_factors(p)
            if rank is not None:
                adapter.factors = {m: truncate(f, rank) for m, f in adapter.factors.items()}
            items.append(_Item(p.name, "lora", p, adapter))
        else:
            items.append(_Item(p.name, adapter_method(fields), p, _convert(p, fields, bases.get(fields, p), rank)))
    return items


def _vllm_config(adapter: AdapterFactors) -> dict[str, Any]:
    """Config fields that make the written dir vLLM-ready: suffix targets, r = max rank, every scale 1."""
    ranks = adapter.ranks()
    r = max(ranks.values())
    differing = {re.escape(m): k for m, k in ranks.items() if k != r}
    return {
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": differing,
        "alpha_pattern": dict(differing),
        "use_rslora": False,
    }


def _write(folder: Path, adapter: AdapterFactors, source: str) -> None:
    write_factors(folder, adapter, provenance={"export": {"format": "vllm", "source": source}})
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(_vllm_config(adapter))
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")  # inside export's atomic temp dir
    problems = vllm_problems(folder)
    assert not problems, (folder, problems)  # the writer above produces vLLM-ready dirs by construction


def _drop_saved(name: str, adapter: AdapterFactors, drop: bool, warnings: list[str]) -> None:
    if not adapter.saved:
        return
    listed = ", ".join(adapter.saved)
    if not drop:
        raise AdapterFormatError(
            f"{name} saves whole modules (modules_to_save: {listed}), which vLLM's LoRA loader refuses. "
            "Pass --drop-saved (python: drop_saved=True) to export only the LoRA part — its outputs will differ "
            "from the original — or merge the adapter into the base instead (lorakit merge --into-base)."
        )
    warnings.append(f"{name}: dropped modules_to_save {listed}; vLLM's outputs will differ from the original's.")
    adapter.saved = {}


def export_vllm(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    base: str | Path | nn.Module | None = None,
    rank: int | None = None,
    drop_saved: bool = False,
) -> ExportReport:
    """Write one vLLM-ready plain-LoRA PEFT dir per adapter under ``out``/<name> (the whole export is atomic).

    ``base`` (a bundled name, a checkpoint dir or a loaded model) is needed only for non-LoRA methods;
    it defaults to each adapter's base_model_name_or_path. ``rank`` is passed to ``to_lora`` (and truncates
    plain LoRAs); None keeps each method's own. ``drop_saved`` drops modules_to_save instead of refusing.
    """
    if not inputs:
        raise ConfigError("give at least one adapter dir or collection to export.")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank}.")
    out = Path(out)
    items = _sources(inputs, _Bases(base), rank)
    check_names(
        [item.name for item in items],
        "export",
        "each exports to OUT/<name> (a dir's name or a collection's adapter name); rename one.",
    )
    report = ExportReport(out, {}, {}, 0)
    for item in items:
        _drop_saved(item.name, item.adapter, drop_saved, report.warnings)
        if not item.adapter.factors:
            raise AdapterFormatError(f"{item.source}: {item.name} has no LoRA modules left to export.")
        if "embedding" in item.adapter.kinds.values():
            report.warnings.append(
                f"{item.name}: has embedding LoRAs; vLLM applies them only where the model supports it."
            )
        report.adapters[item.name], report.methods[item.name] = out / item.name, item.method
        report.max_rank = max(report.max_rank, *item.adapter.ranks().values())
    if report.max_rank > VLLM_MAX_LORA_RANKS[-1]:
        raise ConfigError(
            f"the largest rank is {report.max_rank} but vLLM allows at most 512; pass rank= (CLI --rank)."
        )
    with atomic_dir(out, marker=MANIFEST) as tmp:
        for item in items:
            _write(tmp / item.name, item.adapter, str(item.source))
        manifest = {
            "format": "vllm",
            "adapters": {
                i.name: {"method": i.method, "source": str(i.source), "rank": max(i.adapter.ranks().values())}
                for i in items
            },
            "max_lora_rank": report.max_lora_rank,
            "warnings": report.warnings,
            "command": report.command(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return report
