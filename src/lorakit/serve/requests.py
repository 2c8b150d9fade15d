"""One generation request: its options, its growing output, sampling, and stop handling."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.errors import ConfigError


@dataclass
class Request:
    """A prompt (token ids) to continue with ``adapter`` (None: the base), and what came of it."""

    prompt_ids: list[int]
    adapter: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    on_text: Callable[[Request, str], None] | None = None  # streaming: called with each new piece of text
    # filled in while it runs
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length", "cancelled" or "error"
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    slot: int = -1
    core: tuple[int, int] | None = None  # (collection, core) for a compressed adapter
    pad: int = 0  # left padding of this row in the running cache
    emitted: int = 0  # characters of text already streamed
    generator: torch.Generator | None = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ConfigError("the prompt is empty; send at least one token.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_tokens must be ≥ 1, got {self.max_new_tokens}.")
        if not 0.0 <= self.temperature <= 100.0:
            raise ConfigError(f"temperature must be in [0, 100], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.temperature > 0:  # a fresh seed; not torch.seed(), which reseeds every device's generator and
            # formats a stack trace for each (tens of ms on the server's event loop under load)
            self.generator = torch.Generator()
            self.generator.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))

    @property
    def sort_key(self) -> tuple[int, int, int]:
        core = self.core or (-1, -1)
        return (self.slot, core[0], core[1])


def sample(logits: torch.Tensor, req: Request) -> int:
    """The next token from ``logits`` (V,): greedy at temperature 0, else top-p sampling."""
    if req.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / req.temperature, dim=-1)
    if req.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < req.top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=req.generator))


def update_text(req: Request, tokenizer: Any, eos: set[int]) -> None:
    """After a new token: decode, apply stop strings/eos/length, and stream what is final."""
    token = req.out_ids[-1]
    ids = req.out_ids[:-1] if token in eos else req.out_ids
    text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""
    cut = min((i for s in req.stop if (i := text.find(s)) >= 0), default=-1)
    if cut >= 0:
        text, req.finish_reason = text[:cut], "stop"
    elif token in eos:
        req.finish_reason = "stop"
    elif len(req.out_ids) >= req.max_new_tokens:
        req.finish_reason = "length"
    req.text = text
    if req.on_text is None:
        return
    final = len(text)
    if req.finish_reason is None:  # hold back what may still become a stop string or a split character
        final -= max((len(s) - 1 for s in req.stop), default=0)
        while final > 0 and text[final - 1] == "\ufffd":
            final -= 1
    if final > req.emitted:
        piece, req.emitted = text[req.emitted : final], final
        req.on_text(req, piece)


@dataclass
class Completion:
    """What :meth:`Engine.generate` returns for one prompt."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    adapter: str | None
    prompt_tokens: int
    error: str | None = None
