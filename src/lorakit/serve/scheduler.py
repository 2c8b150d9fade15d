"""Continuous batching: the queue of waiting requests, admission, and the step loop.

Each :meth:`Scheduler.step` admits waiting requests while the batch (``max_batch``) and the adapter
slots allow, prefills them together (left-padded, rows sorted by adapter slot), joins them to the
running batch, whose KV cache is re-packed around them (``serve/kv.py``), then decodes one token
for every running request; finished requests leave between steps. :meth:`Scheduler.start` runs
steps in a background thread while there is work (the server runs one).

transformers' own continuous batching (``generate_batch``, paged cache) was evaluated as the
scheduler: it packs every request into one flat row per step and gives a model no per-token
request identity to route adapters by, so the engine keeps this small scheduler.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Protocol

import torch

from lorakit.serve import kv
from lorakit.serve.requests import Request, sample, update_text


class Runner(Protocol):
    """What the scheduler needs of the engine: adapters bound to requests, and one forward pass."""

    tokenizer: Any
    eos: set[int]

    def bind(self, reqs: list[Request]) -> None:
        """Give each request its adapter's slot (or compressed core); a failure releases what was taken."""

    def unbind(self, r: Request) -> None:
        """Release the request's slot."""

    def can_bind(self, reqs: list[Request]) -> bool:
        """Whether the adapters of ``reqs`` fit into the slots at once."""

    def forward_rows(self, reqs: list[Request], tokens_per_row: int, **inputs: Any) -> Any:
        """The model's output for a batch whose row b serves ``reqs[b]``."""


class Scheduler:
    """Requests of ``runner`` from submission to completion, ``max_batch`` at a time."""

    def __init__(self, runner: Runner, max_batch: int):
        self.runner, self.max_batch = runner, max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.running: list[Request] = []
        self.kv: Any = None
        self.tokens_generated = 0
        self._thread: threading.Thread | None = None
        self._stop = False

    @property
    def started(self) -> bool:
        return self._thread is not None

    def submit(self, req: Request) -> Request:
        with self.wake:
            self.waiting.append(req)
            self.wake.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop ``req``: a waiting one leaves the queue now (its place is free at once), a running one at the
        next step; either finishes with reason "cancelled"."""
        req.cancelled = True
        with self.wake:
            for i, waiting in enumerate(self.waiting):
                if waiting is req:
                    del self.waiting[i]
                    self._finish(req, "cancelled", None, bound=False)
                    break
            self.wake.notify()

    def step(self) -> None:
        """Admit and prefill waiting requests, then decode one token for every running request."""
        new: list[Request] = []
        try:
            self._admit(new)
            if new:
                self._prefill(new)
            if self.running:
                self._decode()
        except Exception as e:  # noqa: BLE001 - a failing step fails its requests, never the server
            message = f"{type(e).__name__}: {e}"
            for r in {id(r): r for r in [*self.running, *new]}.values():
                if not r.done.is_set():
                    self._finish(r, "error", message)
            self.running, self.kv = [], None

    def _admit(self, new: list[Request]) -> None:
        """Move waiting requests into ``new`` (bound to slots) while the batch and the slots allow.

        The lock is held only to take a request off the queue: binding may page an adapter in, and
        ``submit`` (on the server's event loop) must never wait for that."""
        while len(self.running) + len(new) < self.max_batch:
            with self.wake:
                if not self.waiting:
                    return
                req = self.waiting[0]
                if req.cancelled:
                    self.waiting.popleft()
                    self._finish(req, "cancelled", None, bound=False)
                    continue
                if not self.runner.can_bind([*self.running, *new, req]):
                    return
                self.waiting.popleft()
            try:
                self.runner.bind([req])
            except Exception as e:  # noqa: BLE001 - e.g. removed while it waited: this request fails alone
                self._finish(req, "error", str(e), bound=False)
                continue
            new.append(req)

    def _prefill(self, new: list[Request]) -> None:
        new.sort(key=lambda r: r.sort_key)
        T = max(len(r.prompt_ids) for r in new)
        ids = torch.zeros(len(new), T, dtype=torch.long)
        mask = torch.zeros(len(new), T, dtype=torch.long)
        for i, r in enumerate(new):
            n = len(r.prompt_ids)
            ids[i, T - n :], mask[i, T - n :] = torch.tensor(r.prompt_ids), 1
            r.pad = T - n
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.runner.forward_rows(
            new, T, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
        )
        self._join(new, out.past_key_values, T)
        self._emit(new, out.logits[:, -1])

    def _join(self, new: list[Request], cache: Any, T: int) -> None:
        if self.kv is None:
            self.running, self.kv = new, cache
            return
        L = self.kv.get_seq_length()
        for r in self.running:
            r.pad += max(T - L, 0)
        for r in new:
            r.pad += max(L - T, 0)
        rows = [*self.running, *new]
        order = sorted(range(len(rows)), key=lambda i: rows[i].sort_key)
        self.kv = kv.select(kv.join(self.kv, cache), torch.tensor(order))
        self.running = [rows[i] for i in order]

    def _decode(self) -> None:
        reqs = self.running
        L = self.kv.get_seq_length()
        ids = torch.tensor([[r.out_ids[-1]] for r in reqs])
        mask = torch.ones(len(reqs), L + 1, dtype=torch.long)
        for i, r in enumerate(reqs):
            mask[i, : r.pad] = 0
        pos = torch.tensor([[L - r.pad] for r in reqs])
        out = self.runner.forward_rows(
            reqs,
            1,
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=self.kv,
            use_cache=True,
        )
        self.kv = out.past_key_values
        self._emit(reqs, out.logits[:, -1])

    def _emit(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample each request's next token; finished ones leave the batch (and the cache)."""
        for i, r in enumerate(reqs):
            r.out_ids.append(sample(logits[i], r))
            self.tokens_generated += 1
            update_text(r, self.runner.tokenizer, self.runner.eos)
            if r.cancelled and r.finish_reason is None:
                r.finish_reason = "cancelled"
        done = [r for r in self.running if r.finish_reason is not None]
        if not done:
            return
        keep = [i for i, r in enumerate(self.running) if r.finish_reason is None]
        for r in done:
            self._finish(r, r.finish_reason or "stop", None)
        if not keep:
            self.running, self.kv = [], None
            return
        trim = min(self.running[i].pad for i in keep)
        self.kv = kv.select(self.kv, torch.tensor(keep), trim)
        self.running = [self.running[i] for i in keep]
        for r in self.running:
            r.pad -= trim

    def _finish(self, r: Request, reason: str, error: str | None, *, bound: bool = True) -> None:
        r.finish_reason, r.error = reason, error
        if bound:
            self.runner.unbind(r)
        if r.on_text is not None and error is None and len(r.text) > r.emitted:
            piece, r.emitted = r.text[r.emitted :], len(r.text)
            r.on_text(r, piece)
        r.done.set()

    # ---- the background loop ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self.wake:
                self._stop = True
                self.wake.notify()
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self._stop and not self.waiting and not self.running:
                    self.wake.wait()
                if self._stop:
                    return
            self.step()
