"""What to extract, decided from the two checkpoints' headers and the base config (no weights read).

The base config is instantiated on the meta device, so target selection uses the same rules as
``lk.attach`` (suffixes, regex, ``"all-linear"``) and knows each module's layer type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.errors import CheckpointError, TargetError
from lorakit.extract.checkpoint import Checkpoint
from lorakit.inject import find_targets, logical_modules
from lorakit.methods import _layers as L


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


def _tied_head(model: Any, b: Checkpoint) -> tuple[str, str] | None:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    head_name, emb_name = names[id(head)], names[id(emb)]
    return (emb_name, head_name) if f"{head_name}.weight" not in b else None


def plan_modules(
    b: Checkpoint,
    t: Checkpoint,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None,
    *,
    lora_embeddings: bool,
) -> Plan:
    check_pair(b, t)
    model = skeleton(b)
    keys: dict[str, list[str]] = {}
    for k in sorted(b.keys(), key=lambda k: (str(b.entries[k].file), b.entries[k].start)):
        keys.setdefault(k.rpartition(".")[0], []).append(k)
    try:
        chosen = find_targets(model, targets, exclude)
    except TargetError as e:
        raise CheckpointError(f"targets do not fit {b.path}: {e}") from e
    types = dict(logical_modules(model))
    lora = {m: L.layer_kind(types[m], m) for m in chosen}
    if lora_embeddings:
        lora.update({n: "embedding" for n, m in types.items() if isinstance(m, nn.Embedding)})
    tied = _tied_head(model, b)
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
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return Plan(list(keys), keys, lora, tied, "CAUSAL_LM" if causal else None, lora_bias)
