"""Tiny random models for tests and quick runs (the `tiny` workload: 2 layers, hidden 64, vocab 256)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel


def tiny_llama(seed: int = 0, *, layers: int = 2, hidden: int = 64, vocab: int = 256) -> LlamaForCausalLM:
    """A random Llama (q/k/v/o, gate/up/down projections) in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    config._name_or_path = "lorakit/tiny-llama"
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, *, layers: int = 2, hidden: int = 64, vocab: int = 256) -> GPT2LMHeadModel:
    """A random GPT-2 (Conv1D layers: c_attn, c_proj, c_fc) in eval mode."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    config._name_or_path = "lorakit/tiny-gpt2"
    return GPT2LMHeadModel(config).eval()


def smollm2_shape(layers: int = 30, seed: int = 0) -> LlamaForCausalLM:
    """SmolLM2-135M's shape with random weights (the `smollm2-shape` benchmark workload)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )
    return LlamaForCausalLM(config).eval()


class TinyUNet(nn.Module):
    """A random ε-prediction UNet for diffusion tests: ε̂ = f(x_t (N, C, H, W), t (N,)), H and W even.

    conv_in → down (stride-2 conv, plus a sinusoidal timestep embedding through ``time``) → mid → nearest ×2
    upsample and ``up`` → concatenated with the conv_in skip → conv_out; SiLU between. Every layer an adapter
    targets is an nn.Conv2d (groups=1) but ``time`` (an nn.Linear)."""

    def __init__(self, channels: int = 3, width: int = 16, embed: int = 32):
        super().__init__()
        self.embed = embed
        self.time = nn.Linear(embed, 2 * width)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.Conv2d(2 * width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(2 * width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(10_000) * torch.arange(self.embed // 2, device=x.device) / (self.embed // 2))
        angles = t.float()[:, None] * freqs  # (N, embed/2)
        e = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))  # (N, 2w)
        h1 = F.silu(self.conv_in(x))  # (N, w, H, W)
        h2 = F.silu(self.down(h1) + e[:, :, None, None])  # (N, 2w, H/2, W/2)
        h2 = F.silu(self.mid(h2))  # (N, 2w, H/2, W/2)
        u = F.silu(self.up(F.interpolate(h2, scale_factor=2.0, mode="nearest")))  # (N, w, H, W)
        return self.conv_out(torch.cat([u, h1], dim=1))  # (N, C, H, W)


def tiny_unet(seed: int = 0, *, channels: int = 3, width: int = 16) -> TinyUNet:
    """A random :class:`TinyUNet` in eval mode."""
    torch.manual_seed(seed)
    return TinyUNet(channels, width).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every trainable (adapter) parameter random values, so its effect is visible in outputs.

    Adapters with a training-time schedule (``set_step``, e.g. SingLoRA's ramp u(t), which is 0 at
    t = 0 whatever the weights) are moved one step in, as after a first training step.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    from lorakit.methods._api import AdapterModule

    for m in model.modules():
        if isinstance(m, AdapterModule):
            m.set_step(1)


def save_tuned_pair(
    folder: Path, make: Callable[[int], PreTrainedModel], *, seed: int, std: float = 0.01
) -> tuple[Path, Path]:
    """``folder/base`` = ``make(0)`` and ``folder/tuned`` = it plus ``std`` Gaussian noise on every
    parameter (seeded), both saved with ``save_pretrained``: a full fine-tune pair for extraction tests."""
    make(0).save_pretrained(folder / "base")
    tuned = make(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(std * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    tuned.save_pretrained(folder / "tuned")
    return folder / "base", folder / "tuned"
