"""A targeted module's weight read from a checkpoint (base or full fine-tune), in (out, in) orientation.

Weights are read one tensor at a time with :class:`lorakit.extract.checkpoint.Checkpoint` (no model
is built). The stored layout depends on the layer kind the adapter recorded: ``nn.Linear`` keeps
(out, in); GPT-2 ``Conv1D`` keeps (in, out) and ``nn.Embedding`` (vocab, dim), the map
vocab → dim, so both are transposed to (out, in).
"""

from __future__ import annotations

import re

import torch

from lorakit.errors import CheckpointError
from lorakit.extract.checkpoint import Checkpoint

TIED_INPUT = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings)\.weight$")  # what a tied output head reads


def weight_key(ckpt: Checkpoint, module: str) -> str | None:
    """The checkpoint key of ``module``'s weight, tolerating a prefix added or dropped (``model.``, ``bert.``)."""
    exact = f"{module}.weight"
    if exact in ckpt:
        return exact
    names = ckpt.keys()
    suffix = [k for k in names if k.endswith("." + exact)]
    if len(suffix) == 1:
        return suffix[0]
    parts = module.split(".")
    for i in range(1, len(parts)):
        key = ".".join(parts[i:]) + ".weight"
        if key in ckpt:
            return key
    if module.split(".")[-1] == "lm_head" and ckpt.config.get("tie_word_embeddings", True):
        tied = [k for k in names if TIED_INPUT.search(k)]
        return tied[0] if len(tied) == 1 else None
    return None


def module_weight(ckpt: Checkpoint, module: str, kind: str, shape: tuple[int, int]) -> torch.Tensor | None:
    """``module``'s weight as an (out, in) float32 matrix of ``shape``; None if the checkpoint lacks it."""
    key = weight_key(ckpt, module)
    if key is None:
        return None
    stored = ckpt.get(key)
    W = stored.T if kind in ("conv1d", "embedding") else stored  # (out, in)
    if tuple(W.shape) != shape:
        raise CheckpointError(
            f"{ckpt.path}: {key} has shape {tuple(stored.shape)}, which as a {kind} layer is {tuple(W.shape)} "
            f"(out, in), but the adapter's ΔW for {module} is {shape}; use the base the adapter was trained on."
        )
    return W.contiguous()
