"""The serving engine: one base model, thousands of registered adapters, continuously batched requests.

    engine = Engine("smollm2-135m", max_slots=32)
    engine.add_adapter("add", "adapters/add")
    outs = engine.generate(["12+34=", "Hi"], adapters=["add", None], max_new_tokens=8)

The engine is the façade: it owns the base model, the registered adapters (``serve/cache.py``,
slots in ``serve/slots.py``, compressed collections) and one forward pass, in which forward hooks
apply every token's adapter with the batched ops (``serve/plan.py``), so one forward serves many
adapters. Requests over time (the queue, admission, prefill and decode steps, the background
loop) are the scheduler's (``serve/scheduler.py``), which drives the engine through
:class:`~lorakit.serve.scheduler.Runner`: ``bind``, ``unbind``, ``can_bind`` and ``forward_rows``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.inject import find_targets
from lorakit.models.heads import contiguous_head
from lorakit.serve.cache import AdapterCache, check_name
from lorakit.serve.loading import load_collection, load_factors
from lorakit.serve.plan import CompressedSet, ForwardPlan, Router
from lorakit.serve.requests import Completion, Request
from lorakit.serve.scheduler import Scheduler
from lorakit.serve.slots import SlotBank


class Engine:
    """Serve ``base`` (a model or a bundled name) with per-request adapters.

    ``max_slots`` adapters can be in one batch at once (more are registered and wait in RAM);
    ``max_batch`` requests run together; ``state_dir`` persists the adapter registry.
    """

    def __init__(
        self,
        base: nn.Module | str = "smollm2-135m",
        tokenizer: Any = None,
        *,
        max_slots: int = 32,
        max_batch: int = 64,
        state_dir: str | Path | None = None,
    ):
        if isinstance(base, str):
            from lorakit.models import load_base

            self.base_name = base
            base, tokenizer = load_base(base)
        else:
            self.base_name = getattr(getattr(base, "config", None), "_name_or_path", "") or "base"
        self.model, self.tokenizer = base.eval(), tokenizer
        self.modules = find_targets(self.model, "all-linear")
        dtype = next(self.model.parameters()).dtype
        dims = {m: (int(w.shape[1]), int(w.shape[0])) for m in self.modules if (w := self._weight(m)) is not None}
        self.bank = SlotBank(dims, max_slots, dtype=dtype)
        self.cache = AdapterCache(self.bank, self._load_factors, state_dir)
        self.router = Router()
        self.router.install(self.model, list(dims))
        contiguous_head(self.model)
        self.eos = self._eos_ids()
        self.lock = threading.RLock()  # the model: one forward (or adapter conversion) at a time
        self.scheduler = Scheduler(self, max_batch)
        self.collections: list[CompressedSet] = []
        self.compressed: dict[str, tuple[int, int]] = {}  # name -> (collection, core)
        self.cache.restore()

    def _eos_ids(self) -> set[int]:
        eos: Any = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    # ---- adapters ------------------------------------------------------------------------------

    def _weight(self, module: str) -> torch.Tensor | None:
        layer = self.model.get_submodule(module)
        if L.is_quantized(layer):  # a quantized base: its dequantized (out, in) weight
            return L.weight_out_in(layer)
        w = getattr(layer, "weight", None)
        if w is None or w.ndim != 2:
            return None
        # Conv1D (GPT-2) stores (in, out); the bank is (out, in)
        return w.T if type(self.model.get_submodule(module)).__name__ == "Conv1D" else w

    def _load_factors(self, path: Path) -> Any:
        return load_factors(self.model, path, {m: self._weight(m) for m in self.bank.dims}, self.lock)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Register the adapter dir at ``path`` (any method with ``to_lora``) under ``name``."""
        check_name(name)
        if name in self.compressed:
            raise ConfigError(f"{name!r} already names an adapter of a compressed collection; pick another name.")
        self.cache.register(name, path)

    def add_factors(self, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Register an adapter given as factors {module: (A (r, in), scale·B (out, r))}, e.g. a generated one."""
        check_name(name)
        for module, (A, B) in factors.items():
            w = self._weight(module) if module in self.bank.dims else None
            if w is None or A.ndim != 2 or B.shape != (w.shape[0], A.shape[0]) or A.shape[1] != w.shape[1]:
                raise ConfigError(f"adapter {name!r}: factors for {module!r} do not fit a served linear layer.")
        self.cache.register(name, f"<factors:{name}>", persist=False, factors=factors)

    def remove_adapter(self, name: str) -> None:
        """Unregister ``name``; requests already running with it finish first, new ones are refused."""
        try:
            self.cache.unregister(name)
        except KeyError:
            raise ConfigError(f"no adapter named {name!r} is registered.") from None

    def add_collection(self, path: str | Path) -> list[str]:
        """Serve every adapter of a compressed collection (``lorakit compress``); returns their names."""
        coll = load_collection(path, {m: self._weight(m) for m in self.bank.dims})
        clash = sorted(set(coll.names) & (set(self.cache.names()) | set(self.compressed)))
        if clash:
            raise ConfigError(f"{path}: adapter name {clash[0]!r} is already registered; remove it first.")
        with self.lock:
            self.collections.append(coll)
            for i, n in enumerate(coll.names):
                self.compressed[n] = (len(self.collections) - 1, i)
        return list(coll.names)

    def preload(self, names: list[str]) -> None:
        """Copy registered adapters into slots now (e.g. the popular ones before traffic starts), so the
        batches that use them next do not pay the copies; LRU eviction goes on as usual afterwards.
        Compressed adapters need no slot. At most ``max_slots`` names."""
        todo = [n for n in dict.fromkeys(names) if n is not None and n not in self.compressed]
        for name in todo:
            self._check_adapter(name)
        self.cache.preload(todo)

    def adapters(self) -> list[str]:
        """Every adapter name a request can use (registered and compressed)."""
        return sorted([*self.cache.names(), *self.compressed])

    def _check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.cache and name not in self.compressed:
            raise ConfigError(f"unknown adapter {name!r}; registered: {', '.join(self.adapters()[:20]) or 'none'}.")

    def bind(self, reqs: list[Request]) -> None:
        """Give each request its slot (or compressed core); a failure releases what was taken."""
        done: list[Request] = []
        try:
            for r in reqs:
                self._check_adapter(r.adapter)
                if r.adapter in self.compressed:
                    r.core = self.compressed[r.adapter]
                elif r.adapter is not None:
                    r.slot = self.cache.acquire(r.adapter)
                done.append(r)
        except BaseException:
            for r in done:
                self.unbind(r)
            raise

    def unbind(self, r: Request) -> None:
        if r.slot >= 0 and r.adapter is not None:
            self.cache.release(r.adapter)
        r.slot, r.core = -1, None

    def can_bind(self, reqs: list[Request]) -> bool:
        """Whether the registered adapters of ``reqs`` fit into the slots at once."""
        return self.cache.can_acquire({r.adapter for r in reqs if r.adapter is not None and r.adapter in self.cache})

    # ---- one forward pass ---------------------------------------------------------------------

    def _plan(self, reqs: list[Request], tokens_per_row: int) -> ForwardPlan:
        slots = torch.tensor([r.slot for r in reqs], dtype=torch.long).repeat_interleave(tokens_per_row)
        cores = []
        for ci, coll in enumerate(self.collections):
            idx = [r.core[1] if r.core is not None and r.core[0] == ci else -1 for r in reqs]
            cores.append((coll, torch.tensor(idx, dtype=torch.long).repeat_interleave(tokens_per_row)))
        return ForwardPlan(self.bank, slots, cores)

    def _run(self, plan: ForwardPlan, **inputs: Any) -> Any:
        with self.lock, torch.inference_mode():
            self.router.plan = plan
            try:
                return self.model(**inputs)
            finally:
                self.router.plan = None

    def forward_rows(self, reqs: list[Request], tokens_per_row: int, **inputs: Any) -> Any:
        """The model's output for bound ``reqs``, row b with ``tokens_per_row`` tokens of ``reqs[b]``."""
        return self._run(self._plan(reqs, tokens_per_row), **inputs)

    def forward(
        self,
        input_ids: torch.Tensor | list[list[int]],
        adapters: list[str | None],
        *,
        keep: int = 0,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Logits (B, T, V) of one forward pass; row b uses ``adapters[b]`` (None: the base).

        ``keep`` > 0 returns only the last ``keep`` positions' logits (the head is the costliest layer).
        Rows are grouped by adapter for the pass and returned in the input's order. ``model_kwargs``
        go to the model (e.g. a KV cache with ``past_key_values``); with them the rows keep their order.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.ndim != 2 or len(adapters) != ids.shape[0]:
            raise ConfigError(
                f"input_ids must be (batch, seq) with one adapter per row; got {tuple(ids.shape)} and "
                f"{len(adapters)} adapters."
            )
        reqs = [Request(ids[b].tolist(), a, max_new_tokens=1) for b, a in enumerate(adapters)]
        self.bind(reqs)
        try:
            order = list(range(len(reqs)))
            if not model_kwargs:
                order.sort(key=lambda b: reqs[b].sort_key)
            kwargs = {"use_cache": False, **model_kwargs}
            rows = [reqs[b] for b in order]
            logits = self.forward_rows(rows, ids.shape[1], input_ids=ids[order], logits_to_keep=keep, **kwargs).logits
            return logits[torch.argsort(torch.tensor(order))]
        finally:
            for r in reqs:
                self.unbind(r)

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, req: Request) -> Request:
        """Queue ``req`` (checked now: an unknown adapter is a ConfigError); the loop runs it."""
        self._check_adapter(req.adapter)
        return self.scheduler.submit(req)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        adapters: list[str | None] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        *,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> list[Completion]:
        """Continue every prompt with its adapter (None: base); returns one Completion per prompt."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(adapters)} adapters; give one adapter per prompt.")
        reqs = [
            Request(
                self.encode(p),
                a,
                max_new_tokens,
                temperature,
                top_p,
                tuple(stop or ()),
                None if seed is None else seed + i,
            )
            for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
        ]
        for r in reqs:
            self.submit(r)
        if not self.scheduler.started:
            while not all(r.done.is_set() for r in reqs):
                self.step()
        for r in reqs:
            r.done.wait()
        return [Completion(r.text, r.out_ids, r.finish_reason, r.adapter, len(r.prompt_ids), r.error) for r in reqs]

    def encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this engine has no tokenizer; pass prompts as lists of token ids.")
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    # ---- the scheduler (serve/scheduler.py) ----------------------------------------------------------

    def step(self) -> None:
        """One scheduler step: admit and prefill waiting requests, decode a token for every running one."""
        self.scheduler.step()

    def cancel(self, req: Request) -> None:
        """Stop ``req`` early (e.g. its client went away): it finishes with reason "cancelled" at the next step."""
        self.scheduler.cancel(req)

    def start(self) -> None:
        """Run the scheduler in a background thread until :meth:`stop`."""
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def running(self) -> list[Request]:
        """The requests in the running batch."""
        return self.scheduler.running

    @property
    def tokens_generated(self) -> int:
        return self.scheduler.tokens_generated

    @staticmethod
    def check_name(name: str) -> str:
        return check_name(name)
