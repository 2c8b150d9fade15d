"""What stands between a hostile client and the engine: size limits, content types, JSON checks, hang-ups.

The server reads every body through :func:`read_json`: a ``Content-Type`` other than JSON is a 415
(so a cross-site "simple" request, which cannot send JSON, never acts); a body over the limit is a
413 before it is read whole (``Content-Length``) or as soon as the stream passes the limit; the
JSON is parsed off the event loop and checked for nesting depth and for strings that are not valid
Unicode (a lone surrogate such as ``"\\ud800"``), each a 400 that names the field. Messages never
carry Python's exception text, and :func:`redact` takes the server's own folders out of them.

:func:`client_gone` resolves when the client of a request hangs up, so the server can cancel
non-streaming work whose answer nobody will read.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request as HttpRequest

from lorakit.serve.wire import ApiError

MAX_DEPTH = 32  # nesting of objects and lists in a request body (OpenAI's bodies need 5)
MAX_PATH_CHARS = 4096  # an adapter path's length (Linux's PATH_MAX)
T = TypeVar("T")


def require_json(request: HttpRequest) -> None:
    """415 unless the body is declared JSON: browsers send cross-site form or text bodies without asking."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        shown = kind or "none"
        msg = f"send the body as JSON with `Content-Type: application/json` (got {shown})."
        raise ApiError(415, msg, code="unsupported_media_type")


def _too_large(limit: int) -> ApiError:
    msg = f"the request body is larger than {limit} bytes (--max-body-bytes); send a smaller one."
    return ApiError(413, msg, code="request_too_large")


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The body, refused with 413 once it passes ``limit`` bytes (never buffered beyond that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object whose nesting and strings are checked (400 otherwise)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8 (byte {e.start}); send UTF-8 JSON.") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"the request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); send one object."
        raise ApiError(400, msg) from None
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels.") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}.")
    check_tree(body)
    return body


def check_tree(body: dict[str, Any]) -> None:
    """Every value of ``body`` nests at most MAX_DEPTH deep and every string (key or value) is valid Unicode."""
    todo: list[tuple[Any, str, int]] = [(body, "", 1)]
    while todo:
        value, where, depth = todo.pop()
        if isinstance(value, str):
            _check_text(value, where)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            at = where.lstrip(".")[:200]
            raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels (at {at}).", param=at)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            _check_text(str(key), where)
            todo.append((item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]", depth + 1))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        param = where.lstrip(".")[:200] or None
        msg = f"{param or 'the body'} holds an invalid character (a lone surrogate at {e.start}); send valid Unicode."
        raise ApiError(400, msg, param=param) from None


async def read_json(request: HttpRequest, limit: int, pool: Executor) -> dict[str, Any]:
    """The request's JSON object: content type, size and structure checked; parsed in ``pool``."""
    require_json(request)
    raw = await read_body(request, limit)
    return await offload(pool, parse_json, raw)


async def offload(pool: Executor, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on ``pool``: CPU work (parsing, templating, tokenizing) never blocks the event loop."""
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def client_gone(request: HttpRequest) -> None:
    """Resolves when the client hangs up (call after the body is read: only the disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_path_text(raw: str) -> None:
    """An adapter path a file system can take: no control characters, not longer than MAX_PATH_CHARS."""
    if len(raw) > MAX_PATH_CHARS:
        raise ApiError(400, f"path is {len(raw)} characters long; at most {MAX_PATH_CHARS}.", param="path")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise ApiError(400, "path holds a control character (e.g. a NUL byte or a newline).", param="path")


def redact(text: str, roots: dict[Path, str]) -> str:
    """``text`` with each server folder in ``roots`` replaced by its public label (longest first)."""
    for root, label in sorted(roots.items(), key=lambda kv: -len(str(kv[0]))):
        text = text.replace(f"{root}/", f"{label}/" if label else "").replace(str(root), label or ".")
    return text
