"""What to extract, decided from the two checkpoints' headers and the base config (no weights read).

Target selection uses the same rules as ``lk.attach`` (suffixes, regex, ``"all-linear"``). Layer
kinds of known architectures come from the checkpoint and config.json; other architectures are
instantiated on the meta device (which imports transformers and lorakit's layer code, only then).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.errors import CheckpointError
from lorakit.extract.checkpoint import Checkpoint
from lorakit.io.peft_format import name_matches


@dataclass
class Plan:
    modules: list[str]  # every module holding a checkpoint tensor, in file order
    keys: dict[str, list[str]]  # module -> its tensor names
    lora: dict[str, str] = field(default_factory=dict)  # module -> layer kind, for modules to factor
    tied_head: tuple[str, str] | None = None  # (embedding module, head module) when the head reuses it
    task_type: str | None = None
    lora_bias: bool = False  # some factored module's bias changed: every LoRA module gets a lora_B.bias


def check_pair(b: Checkpoint, t: Checkpoint) -> None:
    """Same architecture, same tensor names, same shapes — or a CheckpointError naming the difference."""
    for field_ in ("model_type", "architectures"):
        if b.config.get(field_) and t.config.get(field_) and b.config[field_] != t.config[field_]:
            raise CheckpointError(
                f"mismatched architectures: base {b.path} has {field_}={b.config[field_]!r} but tuned {t.path} has "
                f"{t.config[field_]!r}; extraction needs a fine-tune of that very base."
            )
    missing, extra = sorted(set(b.keys()) - set(t.keys())), sorted(set(t.keys()) - set(b.keys()))
    if missing:
        raise CheckpointError(f"tuned {t.path} lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]!r}.")
    if extra:
        raise CheckpointError(f"tuned {t.path} has {len(extra)} tensor(s) the base lacks, e.g. {extra[0]!r}.")
    for k in b.entries:
        if b.shape(k) != t.shape(k):
            raise CheckpointError(
                f"tensor {k} has shape {b.shape(k)} in the base but {t.shape(k)} in the tuned model (a resized "
                "vocabulary or another model size?); both must have the same shapes."
            )


def skeleton(b: Checkpoint) -> nn.Module:
    """The base architecture on the meta device (module names and types, no memory)."""
    import transformers

    folder = b.path if b.path.is_dir() else b.path.parent
    if not b.config:
        raise CheckpointError(f"{folder} has no config.json; extraction needs the base's Hugging Face config.")
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json cannot be read by transformers: {e}") from e
    arch = (config.architectures or [None])[0]
    cls: Any = getattr(transformers, arch, None) if arch else None  # the class that saved the checkpoint
    with torch.device("meta"):
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


@dataclass
class Layout:
    """Layer kind of every module with a 2-D weight, the output head, and a head tied to an embedding."""

    kinds: dict[str, str]  # module -> "linear" | "conv1d" | "embedding"
    head: str | None
    tied_head: tuple[str, str] | None  # (embedding module, head module) when the head reuses the embedding
    causal: bool


# Architectures whose every 2-D weight is an nn.Linear (GPT-2: a Conv1D) except the embeddings and the
# head; their layout is read off the checkpoint and config.json without building a model (transformers'
# import alone is ~2 s). A test checks it equals the meta-device skeleton's. Others use the skeleton.
LINEAR_ARCHS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "starcoder2"}
CONV1D_ARCHS = {"gpt2"}
EMBEDDINGS = {"embed_tokens": "input", "wte": "input", "wpe": "position"}  # leaf name -> role, in those archs


def fast_layout(b: Checkpoint) -> Layout | None:
    arch = b.config.get("model_type")
    if arch not in LINEAR_ARCHS | CONV1D_ARCHS:
        return None
    kinds: dict[str, str] = {}
    for key in b.entries:
        module, _, param = key.rpartition(".")
        if param != "weight" or len(b.shape(key)) != 2:
            continue
        leaf = module.split(".")[-1]
        if leaf in EMBEDDINGS:
            kinds[module] = "embedding"
        else:
            kinds[module] = "conv1d" if arch in CONV1D_ARCHS and leaf != "lm_head" else "linear"
    inputs = [m for m in kinds if EMBEDDINGS.get(m.split(".")[-1]) == "input"]
    heads = [m for m in kinds if m.split(".")[-1] == "lm_head"]
    tie = b.config.get("tie_word_embeddings", arch in CONV1D_ARCHS)
    tied = (inputs[0], "lm_head") if tie and not heads and len(inputs) == 1 else None
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in b.config.get("architectures") or [])
    return Layout(kinds, heads[0] if heads else ("lm_head" if tied else None), tied, causal)


def skeleton_layout(b: Checkpoint) -> Layout:
    from lorakit import layers as L
    from lorakit.inject import logical_modules

    model: Any = skeleton(b)
    kinds = {n: L.layer_kind(m) for n, m in logical_modules(model) if n and isinstance(m, L.supported_types())}
    names = {id(m): n for n, m in model.named_modules()}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    head_name = names.get(id(head)) if head is not None else None
    tied = None
    if head is not None and emb is not None and head.weight is emb.weight and f"{head_name}.weight" not in b:
        tied = (names[id(emb)], str(head_name))
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return Layout(kinds, head_name, tied, causal)


def select(layout: Layout, modules: list[str], targets: str | Sequence[str], exclude: Any) -> list[str]:
    """The modules ``targets`` picks, by ``lk.attach``'s rules ("all-linear" leaves out the head)."""
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            raise CheckpointError(f"targets {targets!r} is not a valid regular expression: {e}.") from e
    names = sorted(
        set(modules) | set(layout.kinds), key=lambda m: (m not in modules, modules.index(m) if m in modules else 0)
    )
    chosen = []
    for name in names:
        if targets == "all-linear":
            hit = layout.kinds.get(name) in ("linear", "conv1d") and name != layout.head
        else:
            hit = name_matches(targets, name)
        if hit and not (exclude and name_matches(exclude, name)):
            if name not in layout.kinds:
                raise CheckpointError(
                    f"targets={targets!r} matches {name}, which is not a Linear, Conv1D or Embedding."
                )
            chosen.append(name)
    if not chosen:
        raise CheckpointError(f"targets={targets!r} matched no Linear, Conv1D or Embedding module of the checkpoint.")
    return chosen


def plan_modules(
    b: Checkpoint,
    t: Checkpoint,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None,
    *,
    lora_embeddings: bool,
) -> Plan:
    check_pair(b, t)
    layout = fast_layout(b) or skeleton_layout(b)
    keys: dict[str, list[str]] = {}
    for k in sorted(b.keys(), key=lambda k: (str(b.entries[k].file), b.entries[k].start)):
        keys.setdefault(k.rpartition(".")[0], []).append(k)
    chosen = select(layout, list(keys), targets, exclude)
    lora = {m: layout.kinds[m] for m in chosen}
    if lora_embeddings:
        lora.update({n: "embedding" for n, k in layout.kinds.items() if k == "embedding"})
    tied = layout.tied_head
    for module in lora:
        if module not in keys or f"{module}.weight" not in keys[module]:
            if tied and module == tied[1]:
                continue  # the head's weight is the embedding's: handled with it
            raise CheckpointError(
                f"{b.path} has no tensor {module}.weight, which its config implies; was it saved by another "
                "library with other tensor names? Re-save both models with save_pretrained."
            )
    lora = {m: k for m, k in lora.items() if m in keys}
    lora_bias = any(
        f"{m}.bias" in b and not torch.equal(b.get(f"{m}.bias", None), t.get(f"{m}.bias", None)) for m in lora
    )
    if lora_bias:  # PEFT's lora_bias cannot apply to embeddings: those are saved whole instead
        lora = {m: k for m, k in lora.items() if k != "embedding"}
    return Plan(list(keys), keys, lora, tied, "CAUSAL_LM" if layout.causal else None, lora_bias)
