"""Fold one adapter into its base and write a plain Hugging Face checkpoint (W' = W + ΔW per module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.io.atomic import atomic_dir


def merge_into_base(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    max_shard_size: str | int = "2GB",
    check_base: bool = True,
) -> Path:
    """Load ``base`` (bundled name or checkpoint dir), attach ``adapter``, merge it and save to ``out``.

    ``out`` gets safetensors shards (``save_pretrained(max_shard_size=...)``) plus the tokenizer,
    written atomically; ``AutoModelForCausalLM.from_pretrained(out)`` gives the adapted model's logits.
    ``check_base=False`` applies an adapter made for another base on purpose (e.g. an instruct delta
    onto a sibling fine-tune of the same base, RE-Adapt).
    """
    from lorakit.inject import merge
    from lorakit.io import load_adapter
    from lorakit.models import load_base

    model, tok = load_base(str(base))
    load_adapter(model, adapter, check_base=check_base)
    merged: Any = merge(model, inplace=True)  # a plain transformers model
    with atomic_dir(out, marker="config.json") as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tok is not None:
            tok.save_pretrained(tmp)
    return Path(out)
