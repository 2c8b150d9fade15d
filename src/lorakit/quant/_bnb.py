"""bitsandbytes layers built from a full-precision nn.Linear (the nf4, fp4 and int8 kinds share these)."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.quant._api import bitsandbytes

BLOCKSIZE = 64  # bitsandbytes' default 4-bit block, and the one PEFT's LoftQ and the reference quantizer use


def _bias(layer: nn.Linear) -> nn.Parameter | None:
    return None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)


def linear4bit(layer: nn.Linear, quant_type: str) -> nn.Module:
    """A ``bnb.nn.Linear4bit`` (blockwise absmax, block 64, no double quantization, fp32 compute) of ``layer``."""
    bnb = bitsandbytes()
    weight = layer.weight.detach()
    q = bnb.nn.Linear4bit(
        layer.in_features, layer.out_features, bias=layer.bias is not None, compute_dtype=torch.float32,
        compress_statistics=False, quant_type=quant_type, device="meta",
    )  # fmt: skip
    params = bnb.nn.Params4bit(
        weight.float().cpu(), requires_grad=False, compress_statistics=False, quant_type=quant_type, blocksize=BLOCKSIZE
    )
    q.weight = params.to(weight.device)  # moving a Params4bit to a device quantizes it
    q.bias = _bias(layer)
    return q


def linear8bit(layer: nn.Linear) -> nn.Module:
    """A ``bnb.nn.Linear8bitLt`` of ``layer``: int8 rows with one absmax scale per output row (LLM.int8(),
    threshold 0: no fp16 outlier columns)."""
    bnb = bitsandbytes()
    weight = layer.weight.detach()
    q = bnb.nn.Linear8bitLt(
        layer.in_features, layer.out_features, bias=layer.bias is not None, has_fp16_weights=False, threshold=0.0,
        device="meta",
    )  # fmt: skip
    q.weight = bnb.nn.Int8Params(weight.float().cpu(), requires_grad=False, has_fp16_weights=False).to(weight.device)
    q.bias = _bias(layer)
    return q
