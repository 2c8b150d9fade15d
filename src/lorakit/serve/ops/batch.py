"""SlotBatch: which adapter slot each token of one forward uses, planned once for every module.

The engine flattens a forward's (batch, seq) tokens to N rows and gives each its slot (-1 = base
only). ``SlotBatch.build(slots, ranks)`` turns that into what the fast ops need, so the ~200 served
modules of a model pay no planning cost of their own:

- ``segments``: runs of one slot with L·r > ``GATHER_MAX`` (L tokens, rank r), as (slot, start, stop, rank);
  base-only tokens and empty slots (rank 0) are left out. When the tokens are already grouped by
  slot (the engine sorts requests by slot) they index the tokens directly and ``perm`` is None;
  otherwise ``perm`` (M_seg,) lists the segments' tokens grouped by slot and they index ``perm``.
- ``buckets``: the tokens of the other runs (decode: one token per request) by rank, as
  (rank, tokens (M_r,), slots (M_r,)) — each bucket is one pair of ``torch.bmm`` over gathered
  factors at that rank, without padding to the largest rank and without a Python loop per slot.

A compressed collection uses the same object, every core counting as rank 1: ``SlotBatch.for_cores``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

PATHS = ("auto", "segments", "gather")
GATHER_MAX = 16
"""A run of L tokens at rank r goes to gather-BMM when L·r ≤ GATHER_MAX, else to the segment path.

A run costs the segment path a fixed ~5-10 µs of dispatch, gather-BMM a copy of r·(d_in + d_out)
weights per token. Measured on SmolLM2 shapes, d_out ∈ {576, 1536} (``benchmarks/serve_ops.py --only
paths --threads 1``; gather ÷ segments time, medians): L = 1: 0.42-0.70 at r = 8, 0.60-0.97 at r = 16,
0.97-1.83 at r = 32; L = 2: 0.69-1.03 at r = 8, 1.04-1.39 at r = 16; L = 4: 1.31-2.59 at r = 8."""
CORE_GATHER_MAX = 16384
"""Compressed collections: a run of L tokens goes to gather-BMM when L·R² ≤ this (an R×R core copied per
token). Measured (``--only compressed --threads 1``, 576→1536, gather ÷ segments time): R = 32: 0.59
(L=1), 1.03 (L=16); R = 64: 0.74 (L=1), 1.00 (L=4), 1.21 (L=16); R = 128: 0.93 (L=1), 1.47 (L=4)."""

SPAN_MAX = 2
"""A group of G runs whose slots are not consecutive but lie within SPAN_MAX·G consecutive slots (and whose
activations, span·L rows, are no more than its factors, G·r rows) reads that span of the slot buffers in
place, the unused slots' rows idle, instead of gathering its G slots' factors: a gather copies them at
~6 GB/s (cold rows, one slice at a time), a bmm streams them at ~30 GB/s. Measured on 28 SmolLM2 modules,
64 decode tokens at rank 64 (667 MB of factors): in place 22 ms, gathered 55 ms."""

Segment = tuple[int, int, int, int]  # (slot, start, stop, rank)
Span = tuple[int, int, torch.Tensor, torch.Tensor]  # (first slot, span, used rows (G,), unused rows (span - G,))
Group = tuple[int, int, int, tuple[int, ...], torch.Tensor]  # (rank, run length L, start, slots, slots as (G,) tensor)
Read = tuple[bool, Span | None]  # (slots consecutive, span read in place); see SlotBatch.group_reads
Bucket = tuple[int, torch.Tensor, torch.Tensor]  # (rank, tokens (M_r,), slots (M_r,))


@dataclass(frozen=True, eq=False)
class SlotBatch:
    """Token → slot routing for one forward of ``n`` tokens over ``len(ranks)`` slots (see the module doc)."""

    n: int
    ranks: tuple[int, ...]
    segments: tuple[Segment, ...]  # runs with L·r > GATHER_MAX: positions in ``perm``, or tokens when perm is None
    perm: torch.Tensor | None  # (M_seg,) the segments' tokens grouped by slot; None when they index tokens directly
    buckets: tuple[Bucket, ...]  # the tokens of the other runs, by rank, for gather-BMM

    @cached_property
    def segment_groups(self) -> tuple[Group, ...]:
        """``segments`` as groups of consecutive runs with one rank and one length (prefill of equal-length
        prompts with distinct adapters: one group), each applied by one pair of ``torch.bmm``."""
        groups: list[tuple[int, int, int, list[int]]] = []
        for s, a, b, r in self.segments:
            last = groups[-1] if groups else None
            if last and last[0] == r and last[1] == b - a and last[2] + last[1] * len(last[3]) == a:
                last[3].append(s)
            else:
                groups.append((r, b - a, a, [s]))
        device = self.perm.device if self.perm is not None else None
        return tuple((r, n, a, tuple(ss), torch.tensor(ss, dtype=torch.long, device=device)) for r, n, a, ss in groups)

    @cached_property
    def group_reads(self) -> tuple[Read, ...]:
        """Per group of ``segment_groups``, how its slots' factors are read, decided once for every module:
        (True, None) consecutive slots, the buffers' own rows; (False, span) a short span read in place
        (see ``SPAN_MAX``); (False, None) too sparse, gathered."""
        out: list[Read] = []
        for r, n, _, slots, index in self.segment_groups:
            lo, count = min(slots), len(slots)
            span = max(slots) - lo + 1
            if slots == tuple(range(slots[0], slots[0] + count)):
                out.append((True, None))
            elif span > SPAN_MAX * count or span * n > count * r:
                out.append((False, None))
            else:
                unused = sorted(set(range(lo, lo + span)) - set(slots))
                idle = torch.tensor(unused, dtype=torch.long, device=index.device) - lo
                out.append((False, (lo, span, index - lo, idle)))
        return tuple(out)

    @property
    def num_slots(self) -> int:
        return len(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    @property
    def empty(self) -> bool:
        """True when no token receives a delta (N = 0, every slot -1, or only empty slots)."""
        return not self.segments and not self.buckets

    @classmethod
    def build(
        cls,
        slots: torch.Tensor,
        ranks: list[int],
        *,
        path: str = "auto",
        gather_max: int = GATHER_MAX,
        device: torch.device | str | None = None,
    ) -> SlotBatch:
        """Plan a forward: ``slots`` (N,) integer, slot of each token or -1; ``ranks[s]`` = rank of slot s (0 = empty).

        ``path``: "auto" sends a run of L tokens at rank r to gather-BMM when L·r ≤ ``gather_max``, else to the
        segment path; "segments" or "gather" sends every token one way (tests and benchmarks compare them).
        ``device``: where the index tensors go (default: ``slots``'s). Plan from CPU slots with
        ``device="cuda"`` to keep the planning's small host reads off the GPU stream.
        """
        ranks_t = _check(slots, ranks, path)
        n = slots.numel()
        if n == 0:
            return cls(0, tuple(ranks), (), None, ())
        max_work = {"auto": gather_max, "segments": 0, "gather": n * max(ranks, default=0)}[path]  # gather: L·r ≤ it
        tok_rank = ranks_t.to(slots.device)[slots]  # (N,) slot -1 reads the trailing 0
        eff = torch.where(tok_rank > 0, slots, -1)  # (N,) -1 where no delta
        tokens = None  # position -> token id; None = the identity (tokens already grouped by slot)
        vals, counts = torch.unique_consecutive(eff, return_counts=True)  # runs in token order
        vals_l = vals.tolist()
        active = [s for s in vals_l if s >= 0]
        if len(set(active)) != len(active):  # a slot in two runs: group the adapted tokens by a stable sort
            tokens = torch.argsort(eff, stable=True)[int((eff < 0).sum()) :]  # (M,)
            eff, tok_rank = eff[tokens], tok_rank[tokens]  # (M,)
            vals, counts = torch.unique_consecutive(eff, return_counts=True)
            vals_l = vals.tolist()
        run_len = counts.repeat_interleave(counts)  # (N or M,) length of each position's run
        long = (eff >= 0) & (run_len * tok_rank > max_work)  # (N or M,) positions on the segment path
        perm = None if tokens is None or not bool(long.any()) else tokens[long]  # (M_seg,)
        segments = _segments(vals_l, counts.tolist(), ranks, max_work, compact=tokens is not None)
        buckets = _buckets(eff, tok_rank, (eff >= 0) & ~long, tokens)
        if device is not None:
            perm = None if perm is None else perm.to(device)
            buckets = tuple((r, t.to(device), s.to(device)) for r, t, s in buckets)
        return cls(n, tuple(ranks), segments, perm, buckets)

    @classmethod
    def for_cores(
        cls,
        cidx: torch.Tensor,
        num_cores: int,
        shared_rank: int,
        *,
        path: str = "auto",
        device: torch.device | str | None = None,
    ) -> SlotBatch:
        """Routing for a compressed collection: ``cidx`` (N,) core of each token or -1; cores (num_cores, R, R).

        Every core counts as rank 1; a run of L tokens is gathered when L·R² ≤ ``CORE_GATHER_MAX``.
        """
        if not isinstance(shared_rank, int) or shared_rank < 1:
            raise ValueError(f"shared_rank must be a positive int (the cores' size R), got {shared_rank!r}.")
        gather_max = CORE_GATHER_MAX // shared_rank**2
        return cls.build(cidx, [1] * num_cores, path=path, gather_max=gather_max, device=device)


def _check(slots: torch.Tensor, ranks: list[int], path: str) -> torch.Tensor:
    """Validate the inputs of ``SlotBatch.build``; return ``ranks`` + [0] as a tensor (so slot -1 reads rank 0)."""
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.is_floating_point() or slots.is_complex():
        got = f"{slots.dtype} tensor of shape {tuple(slots.shape)}" if isinstance(slots, torch.Tensor) else type(slots)
        raise ValueError(f"slots must be a 1-D integer tensor (N,), one slot per token or -1; got {got}.")
    if slots.dtype == torch.bool:
        raise ValueError("slots must be a 1-D integer tensor (N,), one slot per token or -1; got a bool tensor.")
    if any(not isinstance(r, int) or r < 0 for r in ranks):
        raise ValueError(f"ranks must be non-negative ints, one per slot; got {list(ranks)}.")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    if slots.numel():
        lo, hi = (int(v) for v in torch.aminmax(slots))
        if lo < -1 or hi >= len(ranks):
            raise ValueError(
                f"slots must lie in [-1, {len(ranks) - 1}] (-1 = base only; {len(ranks)} slots); got {lo}..{hi}."
            )
    return torch.tensor([*ranks, 0], dtype=torch.long)


def _segments(
    vals: list[int], counts: list[int], ranks: list[int], max_work: int, *, compact: bool
) -> tuple[Segment, ...]:
    """(slot, start, stop, rank) of each adapted run with L·r > max_work; ``compact``: positions count only those."""
    out, start = [], 0
    for s, c in zip(vals, counts, strict=True):
        take = s >= 0 and c * ranks[s] > max_work
        if take:
            out.append((s, start, start + c, ranks[s]))
        if take or not compact:
            start += c
    return tuple(out)


def _buckets(
    eff: torch.Tensor, tok_rank: torch.Tensor, short: torch.Tensor, tokens: torch.Tensor | None
) -> tuple[Bucket, ...]:
    """The ``short`` positions grouped by rank: (rank, token ids (M_r,), their slots (M_r,))."""
    if not bool(short.any()):
        return ()
    out = []
    for r in torch.unique(tok_rank[short]).tolist():
        pos = torch.nonzero(short & (tok_rank == r)).flatten()  # (M_r,)
        out.append((int(r), pos if tokens is None else tokens[pos], eff[pos]))
    return tuple(out)
