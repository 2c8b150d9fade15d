"""OpenAI's wire format for the server: request fields, the error shape, response bodies and SSE chunks.

Nothing here touches the engine: ``serve/server.py`` parses a body with these helpers, runs the
request, and answers with :meth:`Job.result` (or streams :meth:`Job.chunk` events).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from lorakit.errors import ConfigError
from lorakit.serve.requests import Request

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
MAX_CHOICES = 64  # completions one HTTP request may ask for: prompts × n
UNSUPPORTED = ("best_of", "echo", "logprobs", "top_logprobs", "suffix", "logit_bias", "tools", "functions")


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None  # clients (OpenAI's too) back off and retry
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def number(body: dict[str, Any], key: str, default: Any, lo: float, hi: float, *, integer: bool = False) -> Any:
    """``body[key]`` checked to be a number (an integer if ``integer``) in [lo, hi]; ``default`` if absent."""
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {what} in [{lo}, {hi}], got {value!r}.", param=key)
    return value


def flag(key: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false, got {value!r}.", param=key)
    return value


def stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or len(items) > 4 or not all(isinstance(s, str) and s for s in items):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to 4, got {stop!r}.", param="stop")
    return tuple(items)


def refuse_unsupported(body: dict[str, Any]) -> None:
    """The options this server does not implement are a clear 400, never silently ignored."""
    for key in UNSUPPORTED:
        value = body.get(key)
        if value not in (None, False) and not (key == "best_of" and value == 1):
            raise ApiError(400, f"{key} is not supported by this server; leave it out.", param=key)


def completion_prompts(prompt: Any, encode: Callable[[str], list[int]], vocab: int) -> list[tuple[list[int], str]]:
    """The prompts of a /v1/completions body (a string, token ids, or a list of either), each with its field."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_CHOICES:
            raise ApiError(400, f"prompt lists {len(prompt)} prompts; send at most {MAX_CHOICES}.", param="prompt")
        params = ["prompt"] if len(prompt) == 1 else [f"prompt[{i}]" for i in range(len(prompt))]
        return [(_prompt_ids(p, param, encode, vocab), param) for p, param in zip(prompt, params, strict=True)]
    return [(_prompt_ids(prompt, "prompt", encode, vocab), "prompt")]


def _prompt_ids(prompt: Any, param: str, encode: Callable[[str], list[int]], vocab: int) -> list[int]:
    if isinstance(prompt, str):
        try:
            return encode(prompt)
        except ConfigError as e:
            raise ApiError(400, str(e), param=param) from None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"{param} token id {bad[0]} is outside the vocabulary [0, {vocab}).", param=param)
        return list(prompt)
    msg = f"{param} is required: a non-empty string or a list of token ids (or, for prompt, a list of those)."
    raise ApiError(400, msg, param=param)


def _content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    msg = f"{where}.content must be a string or a list of text parts ({{'type': 'text', 'text': ...}})."
    raise ApiError(400, msg, param=f"{where}.content")


def messages(value: Any) -> list[dict[str, str]]:
    """The chat turns as [{"role", "content"}] (text parts joined), each checked."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects.", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role.", param=f"messages[{i}]")
        out.append({"role": m["role"], "content": _content(m.get("content"), f"messages[{i}]")})
    return out


@dataclass(frozen=True)
class Sampling:
    """The decoding options of one request."""

    n: int  # choices per prompt
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def sampling(body: dict[str, Any], *, chat: bool, default_max_tokens: int) -> Sampling:
    """The decoding fields of ``body`` (OpenAI's defaults: temperature 1, top_p 1), each checked."""
    max_tokens = number(body, "max_completion_tokens", None, 1, 2**31, integer=True) if chat else None
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", default_max_tokens, 1, 2**31, integer=True)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be in (0, 1]; use temperature 0 for greedy decoding.", param="top_p")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object like {'include_usage': true}.", "stream_options")
    return Sampling(
        n=number(body, "n", 1, 1, MAX_CHOICES, integer=True),
        max_tokens=max_tokens,
        temperature=float(number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(top_p),
        stop=stop_strings(body),
        seed=number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stream=flag("stream", body.get("stream")),
        include_usage=flag("stream_options.include_usage", options.get("include_usage")),
    )


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class Job:
    """One HTTP generation request in flight: what was asked, its engine requests (one per choice: prompt i's
    choice j is ``reqs[i·n + j]``, as OpenAI numbers them) and the queue their events arrive on."""

    model: str  # as the client named it (the base's name when it named none)
    options: Sampling
    reqs: list[Request]
    queue: asyncio.Queue[tuple[int, str | None]]  # (choice, final text piece) when streaming; (choice, None): done
    chat: bool
    start: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.uid}"

    def usage(self) -> dict[str, int]:
        """Token counts: each prompt once (however many choices it has), every choice's completion."""
        n = sum(len(r.prompt_ids) for r in self.reqs[:: self.options.n])
        m = sum(len(r.out_ids) for r in self.reqs)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def _body(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, index: int, text: str | None, finish: str | None = None, *, role: bool = False) -> dict[str, Any]:
        """A streamed chunk of choice ``index``: ``text`` (a chat delta, or completion text), ``finish`` on its last."""
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice["delta"] = delta
            return self._body("chat.completion.chunk", [choice])
        choice["text"] = text or ""
        return self._body("text_completion", [choice])

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the token counts."""
        return {**self._body("chat.completion.chunk" if self.chat else "text_completion", []), "usage": self.usage()}

    def result(self) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        choices = []
        for i, req in enumerate(self.reqs):
            choice: dict[str, Any] = {"index": i, "logprobs": None, "finish_reason": req.finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": req.text}
            else:
                choice["text"] = req.text
            choices.append(choice)
        return {**self._body("chat.completion" if self.chat else "text_completion", choices), "usage": self.usage()}
