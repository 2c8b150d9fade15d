"""The batched serving ops equal their plain-torch references (serve/ops/reference.py) on every adapter mix."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.serve.ops import SlotBatch, add_compressed_delta_, add_lora_delta_, compressed_delta_ref, lora_delta_ref
from lorakit.serve.ops.batch import GATHER_MAX

D_IN, D_OUT = 24, 40
RANKS = [8, 16, 0, 4, 16, 2, 8, 1, 16, 4, 8, 0]  # mixed ranks, two empty slots; r_max = 16
S = len(RANKS)
PATHS = ["auto", "segments", "gather"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bank(ranks: list[int], r_max: int = 16, *, dtype=torch.float32, seed: int = 0, device: str = "cpu"):
    """Slot buffers as SlotBank fills them: A (S, r_max, in), B (S, out, r_max), zero past each slot's rank."""
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(len(ranks), r_max, D_IN, dtype=torch.float64)
    B = torch.zeros(len(ranks), D_OUT, r_max, dtype=torch.float64)
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, D_IN, generator=g, dtype=torch.float64)
        B[s, :, :r] = torch.randn(D_OUT, r, generator=g, dtype=torch.float64) / max(r, 1)
    return A.to(device, dtype), B.to(device, dtype)


def mix(kind: str, n: int, num: int, seed: int) -> torch.Tensor:
    """Slot of each of ``n`` tokens over ``num`` slots, following WORKLOADS.md's popularity mixes."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.randint(0, num, (n,), generator=g)
    if kind == "zipf":  # request i uses floor(num · u^(1/α)), α = 0.5: heavily skewed to slot 0
        u = torch.rand(n, generator=g)
        return torch.floor(num * u ** (1 / 0.5)).long().clamp(max=num - 1)
    if kind == "same":
        return torch.full((n,), 3)
    if kind == "distinct":  # every slot once (n = num)
        return torch.randperm(num, generator=g)[:n]
    raise AssertionError(kind)


def order(slots: torch.Tensor, how: str, seed: int) -> torch.Tensor:
    """'grouped': sorted by slot, as the engine sends prefill; 'prefill': 4 requests × tokens; 'shuffled': random."""
    if how == "grouped":
        return slots.sort().values
    if how == "prefill":  # one slot per request, repeated over its tokens, requests in arbitrary order
        return slots[:4].repeat_interleave(len(slots) // 4)
    g = torch.Generator().manual_seed(seed + 1)
    return slots[torch.randperm(len(slots), generator=g)]


def with_base_only(slots: torch.Tensor, seed: int, frac: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    return torch.where(torch.rand(len(slots), generator=g) < frac, -1, slots)


def lora_close(slots: torch.Tensor, path: str, *, A=None, B=None, ranks=RANKS, seed: int = 0, device="cpu") -> None:
    """fast(y0) == y0 + reference, to 1e-5 relative in fp32."""
    if A is None:
        A, B = bank(ranks, device=device)
    g = torch.Generator().manual_seed(seed + 3)
    x = torch.randn(len(slots), D_IN, generator=g).to(device)
    y0 = torch.randn(len(slots), D_OUT, generator=g).to(device)
    slots = slots.to(device)
    expect = y0 + lora_delta_ref(x, slots, A, B, ranks)
    y = y0.clone()
    add_lora_delta_(y, x, A, B, SlotBatch.build(slots, ranks, path=path))
    scale = max(float(expect.abs().max()), 1.0) if len(slots) else 1.0
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("how", ["grouped", "prefill", "shuffled"])
@pytest.mark.parametrize("kind", ["uniform", "zipf", "same", "distinct"])
def test_lora_fast_equals_reference(kind, how, path):
    for seed, n in enumerate([S, 64]):
        if kind == "distinct" and n > S:
            continue
        slots = order(mix(kind, n, S, seed), how, seed)
        lora_close(slots, path, seed=seed)
        lora_close(with_base_only(slots, seed), path, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_lora_decode_and_prefill_shapes(path, device):
    """Decode (one token per request, repeated adapters) and prefill (requests × 32 tokens), grouped and not."""
    decode = torch.tensor([0, 0, 1, 3, 3, 3, 5, -1, 6, 7, 7, 8, 9, 11, 10, 4])
    lora_close(decode, path, device=device)
    lora_close(decode.flip(0), path, device=device)
    prefill = torch.tensor([5, 1, 5, -1, 8]).repeat_interleave(32)
    lora_close(prefill, path, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_from_cpu_slots_serves_any_device(device):
    """The engine plans from CPU slot ids; the index tensors follow ``device=`` (or the activations, lazily)."""
    A, B = bank(RANKS, device=device)
    slots = torch.tensor([4, 4, 1, 0, 0, 0, -1, 4, 8, 8, 9])  # slot 4 in two runs: a grouping perm, and buckets
    x = torch.randn(len(slots), D_IN).to(device)
    expect = lora_delta_ref(x, slots.to(device), A, B, RANKS)
    for plan_device in (device, None):
        batch = SlotBatch.build(slots, RANKS, device=plan_device)
        assert batch.perm is not None and batch.buckets
        y = torch.zeros(len(slots), D_OUT, device=device)
        add_lora_delta_(y, x, A, B, batch)
        torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max()))


@settings(max_examples=40, deadline=None)
@given(
    ranks=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    tokens=st.lists(st.integers(-1, 5), min_size=0, max_size=40),
    path=st.sampled_from(PATHS),
)
def test_lora_fast_equals_reference_any_mix(ranks, tokens, path):
    slots = torch.tensor([t % (len(ranks) + 1) - 1 if t >= 0 else -1 for t in tokens], dtype=torch.long)
    A, B = bank(ranks, r_max=max(max(ranks), 1))
    lora_close(slots, path, A=A, B=B, ranks=ranks)


def test_plan_segments_perm_and_buckets():
    """Grouped tokens index y directly; ungrouped ones get a grouping perm; short low-rank runs are gathered."""
    ranks = [16, 8, 32]
    grouped = SlotBatch.build(torch.tensor([0] * 5 + [-1, -1] + [2, 2, 1]), ranks)
    assert grouped.perm is None
    assert grouped.segments == ((0, 0, 5, 16), (2, 7, 9, 32))  # 5·16 and 2·32 > GATHER_MAX
    ((rank, tokens, slots),) = grouped.buckets  # the single token of rank-8 slot 1: 1·8 ≤ GATHER_MAX
    assert (rank, tokens.tolist(), slots.tolist()) == (8, [9], [1])
    mixed = SlotBatch.build(torch.tensor([2, 0, 2, -1, 0, 1]), ranks)
    assert mixed.perm is not None and mixed.perm.tolist() == [1, 4, 0, 2]  # slot 0's tokens, then slot 2's
    assert mixed.segments == ((0, 0, 2, 16), (2, 2, 4, 32))
    assert [b[1].tolist() for b in mixed.buckets] == [[5]]
    assert GATHER_MAX >= 8  # the rule above is the one the benchmark measured
    cores = SlotBatch.for_cores(torch.tensor([0, 1, 1, 2, 2, 2]), 3, 128)  # R = 128: only single tokens gather
    assert [s[0] for s in cores.segments] == [1, 2] and cores.buckets[0][1].tolist() == [0]
    forced = SlotBatch.build(torch.tensor([2, 0, 2, -1, 0, 1]), ranks, path="gather")
    assert not forced.segments and sorted(t for b in forced.buckets for t in b[1].tolist()) == [0, 1, 2, 4, 5]


@pytest.mark.parametrize("path", PATHS)
def test_equal_length_runs_go_as_groups_and_equal_the_reference(path):
    """Prefill of equal-length prompts with distinct adapters: consecutive runs of one rank and length
    form one group (one bmm pair); a base-only request or another length or rank starts a new one."""
    requests = [1, 4, 8, 0, 6, 10, 3, 9]  # ranks 16, 16, 16, 8, 8, 8, 4, 4
    slots = torch.tensor(requests).repeat_interleave(6)
    plan = SlotBatch.build(slots, RANKS, path="segments")
    assert [(r, n, a, s) for r, n, a, s, _ in plan.segment_groups] == [
        (16, 6, 0, (1, 4, 8)),
        (8, 6, 18, (0, 6, 10)),
        (4, 6, 36, (3, 9)),
    ]
    lora_close(slots, path)
    broken = torch.tensor([1, 4, -1, 8, 0]).repeat_interleave(6)  # base-only rows split the rank-16 runs
    assert [g[3] for g in SlotBatch.build(broken, RANKS, path="segments").segment_groups] == [(1, 4), (8,), (0,)]
    lora_close(broken, path)
    lora_close(torch.cat([slots[6:], slots[:6]]), path)  # slot 1 last: still grouped by slot, perm path
    uneven = torch.cat([torch.full((6,), 1), torch.full((7,), 4), torch.full((6,), 8)])  # another length
    assert len(SlotBatch.build(uneven, RANKS, path="segments").segment_groups) == 3
    lora_close(uneven, path)
    lora_close(slots.flip(0), path)
    even = [8] * 6  # every slot at one rank: slots 0..5 in order read the buffers' rows without a gather
    A, B = bank(even)
    consecutive = torch.arange(6).repeat_interleave(5)
    assert [g[3] for g in SlotBatch.build(consecutive, even, path="segments").segment_groups] == [(0, 1, 2, 3, 4, 5)]
    lora_close(consecutive, path, A=A, B=B, ranks=even)
    lora_close(consecutive.flip(0), path, A=A, B=B, ranks=even)  # 5, 4, ..., 0: gathered
    x = torch.randn(30, D_IN, generator=torch.Generator().manual_seed(9))
    expect = lora_delta_ref(x.double(), consecutive, A.double(), B.double(), even)
    other = {torch.float32: torch.float64, torch.float64: torch.float32}  # buffers in a dtype other than y's
    for y in (torch.zeros(D_OUT, 30).T, torch.zeros(30, D_OUT, dtype=torch.float64)):  # a strided y, then a float64 y
        plan = SlotBatch.build(consecutive, even, path=path)
        add_lora_delta_(y, x.to(y.dtype), A.to(other[y.dtype]), B.to(other[y.dtype]), plan)
        torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)


def test_scattered_slots_in_a_short_span_are_read_in_place_and_equal_the_reference():
    """A group whose slots are not consecutive but lie within SPAN_MAX·G slots (decode of distinct adapters
    in request order: a permutation of the slots) reads that span of the buffers in place; an idle slot's
    contents never reach a used row."""
    even = [8] * 10
    A, B = bank(even)
    A[6], B[6] = float("nan"), float("nan")  # slot 6 lies in the span but no token uses it
    perm = torch.tensor([5, 3, 4, 7, 2])  # slots 2..7: a span of 6 ≤ 2·5, slot 6 idle
    for n in (1, 3):  # decode (one token per run), then runs of 3 tokens
        slots = perm.repeat_interleave(n)
        plan = SlotBatch.build(slots, even, path="segments")
        assert [g[3] for g in plan.segment_groups] == [(5, 3, 4, 7, 2)]
        ((consecutive, (lo, width, used, unused)),) = plan.group_reads
        assert not consecutive
        assert (lo, width, used.tolist(), unused.tolist()) == (2, 6, [3, 1, 2, 5, 0], [4])
        lora_close(slots, "segments", A=A, B=B, ranks=even)
        x = torch.randn(len(slots), D_IN, generator=torch.Generator().manual_seed(n))
        expect = lora_delta_ref(x.double(), slots, A.double(), B.double(), even)
        for y in (torch.zeros(D_OUT, len(slots)).T, torch.zeros(len(slots), D_OUT, dtype=torch.float64)):
            add_lora_delta_(y, x.to(y.dtype), A, B, plan)  # a strided y, then one in another dtype
            torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)
    sparse = torch.tensor([0, 9, 5])  # a span of 10 > 2·3 slots: gathered instead
    assert SlotBatch.build(sparse, even, path="segments").group_reads == ((False, None),)
    lora_close(sparse, "segments", A=A, B=B, ranks=even)
    consecutive = torch.tensor([3, 4, 5])  # already in order: read as they are
    assert SlotBatch.build(consecutive, even, path="segments").group_reads == ((True, None),)


def test_degenerate_inputs_leave_y_unchanged():
    A, B = bank(RANKS)
    for slots in (torch.zeros(0, dtype=torch.long), torch.full((7,), -1), torch.tensor([2, 11, 2, -1])):  # ranks 0
        batch = SlotBatch.build(slots, RANKS)
        assert batch.empty
        y = torch.randn(len(slots), D_OUT)
        before = y.clone()
        add_lora_delta_(y, torch.randn(len(slots), D_IN), A, B, batch)
        assert torch.equal(y, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS)
def test_half_precision_buffers(dtype, path):
    """Compute in the buffers' dtype: close to the fp32 reference of the same (rounded) weights."""
    A, B = bank(RANKS, dtype=dtype)
    slots = order(mix("uniform", 48, S, 7), "grouped", 7)
    x = torch.randn(48, D_IN, generator=torch.Generator().manual_seed(7))
    expect = lora_delta_ref(x, slots, A.float(), B.float(), RANKS)
    y = torch.zeros(48, D_OUT, dtype=dtype)
    add_lora_delta_(y, x.to(dtype), A, B, SlotBatch.build(slots, RANKS, path=path))
    torch.testing.assert_close(y.float(), expect, rtol=0.05, atol=0.05 * float(expect.abs().max()))
    y32 = torch.zeros(48, D_OUT)  # fp32 activations over half buffers: x is cast in, the delta cast out
    add_lora_delta_(y32, x, A, B, SlotBatch.build(slots, RANKS, path=path))
    torch.testing.assert_close(y32, y.float(), rtol=0.05, atol=0.05 * float(expect.abs().max()))


def collection(C: int, R: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(D_OUT, R, generator=g, dtype=torch.float64) / math.sqrt(R)
    V = torch.randn(D_IN, R, generator=g, dtype=torch.float64) / math.sqrt(D_IN)
    cores = torch.randn(C, R, R, generator=g, dtype=torch.float64)
    return U.to(dtype), V.to(dtype), cores.to(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("how", ["grouped", "prefill", "shuffled"])
@pytest.mark.parametrize("kind", ["uniform", "zipf", "same", "distinct"])
def test_compressed_fast_equals_reference(kind, how, path):
    C, R = S, 12
    U, V, cores = collection(C, R)
    for seed, n in enumerate([C, 64]):
        if kind == "distinct" and n > C:
            continue
        cidx = with_base_only(order(mix(kind, n, C, seed), how, seed), seed)
        x, y0 = torch.randn(n, D_IN), torch.randn(n, D_OUT)
        expect = y0 + compressed_delta_ref(x, cidx, U, V, cores)
        y = y0.clone()
        add_compressed_delta_(y, x, U, V, cores, SlotBatch.for_cores(cidx, C, R, path=path))
        torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max()))


@pytest.mark.parametrize("extra", [0, 3])
def test_compressed_with_full_shared_rank_is_exact(extra):
    """R ≥ Σ r_i: U, V span every adapter's column / row space, so U·Σ_i·Vᵀ = B_i·A_i exactly."""
    ranks = [4, 8, 2, 6]
    A, B = bank(ranks, r_max=8, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    B_cat = torch.cat([B[i, :, :r] for i, r in enumerate(ranks)], dim=1)  # (out, Σr)
    A_cat = torch.cat([A[i, :r] for i, r in enumerate(ranks)], dim=0)  # (Σr, in)
    U = torch.linalg.qr(torch.cat([B_cat, torch.randn(D_OUT, extra, generator=g, dtype=torch.float64)], 1)).Q
    V = torch.linalg.qr(torch.cat([A_cat.T, torch.randn(D_IN, extra, generator=g, dtype=torch.float64)], 1)).Q
    assert U.shape[1] == V.shape[1] == sum(ranks) + extra
    cores = torch.stack([U.T @ B[i] @ A[i] @ V for i in range(len(ranks))])  # (C, R, R)
    cidx = torch.tensor([0, 0, 1, -1, 2, 3, 3, 3, 1, 2])
    x = torch.randn(len(cidx), D_IN, generator=g, dtype=torch.float64)
    exact = lora_delta_ref(x, cidx, A, B, ranks)  # each token's own B_i·A_i·x
    y = torch.zeros(len(cidx), D_OUT, dtype=torch.float64)
    add_compressed_delta_(y, x, U, V, cores, SlotBatch.for_cores(cidx, len(ranks), U.shape[1]))
    torch.testing.assert_close(y, exact, rtol=1e-10, atol=1e-10)
    # and the collection as a whole: Σ_i U·Σ_i·Vᵀ = Σ_i B_i·A_i (what merging every adapter would add)
    delta_sum = sum(U @ c @ V.T for c in cores)
    torch.testing.assert_close(delta_sum, sum(B[i] @ A[i] for i in range(len(ranks))), rtol=1e-10, atol=1e-10)


def test_compressed_degenerate_and_half():
    U, V, cores = collection(3, 8)
    for cidx in (torch.zeros(0, dtype=torch.long), torch.full((5,), -1)):
        y = torch.randn(len(cidx), D_OUT)
        before = y.clone()
        add_compressed_delta_(y, torch.randn(len(cidx), D_IN), U, V, cores, SlotBatch.for_cores(cidx, 3, 8))
        assert torch.equal(y, before)
    cidx = torch.tensor([0, 2, 2, -1, 1])
    x = torch.randn(5, D_IN)
    expect = compressed_delta_ref(x, cidx, U, V, cores)
    y = torch.zeros(5, D_OUT)  # fp32 activations, bf16 collection
    Uh, Vh, ch = (t.to(torch.bfloat16) for t in (U, V, cores))
    add_compressed_delta_(y, x, Uh, Vh, ch, SlotBatch.for_cores(cidx, 3, 8))
    torch.testing.assert_close(y, expect, rtol=0.05, atol=0.05 * float(expect.abs().max()))


def test_bad_slots_and_shapes_raise_clear_errors():
    A, B = bank(RANKS)
    slots = torch.tensor([0, 1, -1])
    with pytest.raises(ValueError, match=r"slots must lie in \[-1, 11\].*got 0\.\.12"):
        SlotBatch.build(torch.tensor([0, 12]), RANKS)
    with pytest.raises(ValueError, match="slots must lie"):
        SlotBatch.build(torch.tensor([-2, 0]), RANKS)
    with pytest.raises(ValueError, match="slots must be a 1-D integer tensor"):
        SlotBatch.build(torch.tensor([0.0, 1.0]), RANKS)
    with pytest.raises(ValueError, match="slots must be a 1-D integer tensor"):
        SlotBatch.build(torch.zeros(2, 2, dtype=torch.long), RANKS)
    with pytest.raises(ValueError, match="ranks must be non-negative"):
        SlotBatch.build(slots, [4, -1])
    with pytest.raises(ValueError, match="path must be one of"):
        SlotBatch.build(slots, RANKS, path="fast")
    batch = SlotBatch.build(slots, RANKS)
    x, y = torch.randn(3, D_IN), torch.zeros(3, D_OUT)
    bad = {
        "x must be": (y, torch.randn(4, D_IN), A, B),
        "A must be": (y, x, A[:5], B),
        "B must be": (y, x, A, B[:, :, :8]),
        "y must be": (torch.zeros(3, D_OUT + 1), x, A, B),
        "A has r_max = 8": (y, x, A[:, :8], B[:, :, :8]),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            add_lora_delta_(*args, batch)
    U, V, cores = collection(S, 6)
    bad_c = {
        "V must be": (y, x, U, V[1:], cores),
        "U must be": (y, x, U[:, :5], V, cores),
        "cores must be": (y, x, U, V, cores[:2]),
        "y must be": (torch.zeros(2, D_OUT), x, U, V, cores),
    }
    for message, args in bad_c.items():
        with pytest.raises(ValueError, match=message):
            add_compressed_delta_(*args, batch)
