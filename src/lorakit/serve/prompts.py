"""Prompts of the server's requests: length limits, the chat template, tokenizing, decoding defaults.

:meth:`Prompts.prepare` is the CPU work of a request (templating and tokenizing can take seconds
for a long prompt), so the server runs it on its thread pool, never on the event loop. A prompt is
refused before tokenizing when it has more characters than CHARS_PER_TOKEN per allowed token.
"""

from __future__ import annotations

import logging
from typing import Any

from lorakit.serve.engine import Engine
from lorakit.serve.wire import ApiError, Sampling, completion_prompts, messages, sampling

DEFAULT_MAX_TOKENS = 16  # /v1/completions, as OpenAI's
DEFAULT_CHAT_MAX_TOKENS = 512  # /v1/chat/completions: at most this, and what the context leaves
CHARS_PER_TOKEN = 16  # a prompt longer than this many characters per allowed token is refused untokenized
Prepared = tuple[list[tuple[list[int], str]], Sampling]  # (token ids, field) per prompt; the decoding options
log = logging.getLogger("lorakit.serve")


class Prompts:
    """The prompt checks of one served ``engine``: its tokenizer, its context length and the server's limits."""

    def __init__(self, engine: Engine, max_prompt_tokens: int | None, max_prompt_chars: int | None):
        self.engine, self.max_prompt_tokens = engine, max_prompt_tokens
        config = getattr(engine.model, "config", None)
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self.vocab: int = getattr(config, "vocab_size", None) or 2**63
        tokens = max_prompt_tokens or self.max_positions or 2**15
        self.max_prompt_chars = max_prompt_chars or CHARS_PER_TOKEN * tokens

    def chat_prompt(self, turns: Any) -> list[int]:
        turns = messages(turns)
        self.check_chars(sum(len(t["content"]) + len(t["role"]) for t in turns), "messages")
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            msg = "this model's tokenizer has no chat template; use /v1/completions with a prompt."
            raise ApiError(400, msg, param="messages")
        from jinja2 import TemplateError

        try:
            text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # the template refuses these turns (its raise_exception): say why
            raise ApiError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        except Exception:  # noqa: BLE001 - anything else a template raises: the client sees no internals
            log.warning("the chat template failed on a request's messages", exc_info=True)
            raise ApiError(400, "the chat template cannot render these messages.", param="messages") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def completion_prompts(self, prompt: Any) -> list[tuple[list[int], str]]:
        texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
        for i, text in enumerate(texts):
            if isinstance(text, str):
                self.check_chars(len(text), "prompt" if isinstance(prompt, str) else f"prompt[{i}]")
        return completion_prompts(prompt, self.engine.encode, self.vocab)

    def check_chars(self, n: int, param: str) -> None:
        """Refuse a prompt too long to be within the token limit before tokenizing it (that costs seconds)."""
        if n > self.max_prompt_chars:
            msg = (
                f"the prompt has {n} characters; this server takes at most {self.max_prompt_chars} "
                "(--max-prompt-chars) and tokenizes nothing longer."
            )
            raise ApiError(400, msg, param=param, code="context_length_exceeded")

    def check_length(self, n: int, max_tokens: int, param: str) -> None:
        if n == 0:
            raise ApiError(400, "the prompt is empty; send at least one token.", param=param)
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            msg = (
                f"the prompt has {n} tokens; this server takes at most {self.max_prompt_tokens} (--max-prompt-tokens)."
            )
            raise ApiError(400, msg, param=param, code="context_length_exceeded")
        if self.max_positions is not None and n + max_tokens > self.max_positions:
            msg = (
                f"the prompt has {n} tokens and max_tokens is {max_tokens}, but the model reads at most "
                f"{self.max_positions} positions; shorten the prompt or lower max_tokens."
            )
            where = param if n >= self.max_positions else "max_tokens"
            raise ApiError(400, msg, param=where, code="context_length_exceeded")

    def prepare(self, body: dict[str, Any], chat: bool) -> Prepared:
        """The prompts of ``body`` as token ids, each with its field, and its decoding options, all checked."""
        prompts = (
            [(self.chat_prompt(body.get("messages")), "messages")]
            if chat
            else self.completion_prompts(body.get("prompt"))
        )
        room = (self.max_positions or 2**31) - max(len(ids) for ids, _ in prompts)
        default = max(1, min(DEFAULT_CHAT_MAX_TOKENS, room)) if chat else DEFAULT_MAX_TOKENS
        opts = sampling(body, chat=chat, default_max_tokens=default)
        for ids, param in prompts:
            self.check_length(len(ids), opts.max_tokens, param)
        return prompts, opts
