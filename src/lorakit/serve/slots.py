"""Stacked per-layer slot buffers: the adapters one forward pass can use, as two tensors per module.

For every served module the bank holds ``A: (S, r_max, d_in)`` and ``B: (S, d_out, r_max)``
(scale folded into B), so a batch whose tokens use different adapters reads them by slot index
(see ``serve/ops``). Slot ``s`` holds one adapter of rank ``ranks[s]``; rows and columns past
that rank are zero, and the ops never read them. A module an adapter does not touch keeps a zero
slot (rank 0). ``r_max`` grows when a larger adapter arrives (the buffers are re-allocated once).
"""

from __future__ import annotations

import torch

from lorakit.errors import AdapterFormatError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B·scale (out, r))


class SlotBank:
    """Slot buffers for ``modules`` ({name: (d_in, d_out)}), ``max_slots`` slots each."""

    def __init__(self, modules: dict[str, tuple[int, int]], max_slots: int, *, dtype: torch.dtype, r_max: int = 8):
        if max_slots < 1:
            raise ValueError(f"max_slots must be ≥ 1, got {max_slots}.")
        self.dims = dict(modules)
        self.max_slots, self.dtype, self.r_max = max_slots, dtype, r_max
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, list[int]] = {m: [0] * max_slots for m in modules}
        self._allocate(r_max)

    def _allocate(self, r_max: int) -> None:
        """(Re-)allocate every module's buffers at rank ``r_max``, keeping what the slots hold."""
        for m, (d_in, d_out) in self.dims.items():
            A = torch.zeros(self.max_slots, r_max, d_in, dtype=self.dtype)  # (S, r_max, in)
            B = torch.zeros(self.max_slots, d_out, r_max, dtype=self.dtype)  # (S, out, r_max)
            if m in self.A:
                old = self.A[m].shape[1]
                A[:, :old] = self.A[m]
                B[:, :, :old] = self.B[m]
            self.A[m], self.B[m] = A, B
        self.r_max = r_max

    def write(self, slot: int, name: str, factors: Factors) -> None:
        """Copy adapter ``name``'s factors into ``slot`` (modules it lacks become rank 0 there)."""
        unknown = sorted(set(factors) - set(self.dims))
        if unknown:
            raise AdapterFormatError(f"adapter {name!r} adapts {unknown[0]!r}, which the served base does not have.")
        need = max((a.shape[0] for a, _ in factors.values()), default=0)
        if need > self.r_max:
            self._allocate(need)
        for m in self.dims:
            ranks = self.ranks[m]
            if m not in factors:
                ranks[slot] = 0
                continue
            A, B = factors[m]
            r = A.shape[0]
            d_in, d_out = self.dims[m]
            if A.shape != (r, d_in) or B.shape != (d_out, r):
                raise AdapterFormatError(
                    f"adapter {name!r}: {m} has A {tuple(A.shape)}, B {tuple(B.shape)}; the base layer needs "
                    f"A (r, {d_in}) and B ({d_out}, r)."
                )
            self.A[m][slot, :r] = A
            self.B[m][slot, :, :r] = B
            self.A[m][slot, r:] = 0
            self.B[m][slot, :, r:] = 0
            ranks[slot] = r

    def clear(self, slot: int) -> None:
        for m in self.dims:
            self.ranks[m][slot] = 0

    def nbytes(self, slot: int) -> int:
        """Bytes of adapter weights slot ``slot`` really uses (its ranks, not r_max)."""
        size = torch.finfo(self.dtype).bits // 8
        return sum(r * (d_in + d_out) * size for m, (d_in, d_out) in self.dims.items() if (r := self.ranks[m][slot]))
