"""Plain-torch semantics of the batched serving ops, written for clarity (one token at a time).

The fast paths in ``batched.py`` must give the same results; ``tests/serve/test_ops.py`` checks
them against these functions over many adapter mixes. Nothing here is meant to be fast.
"""

from __future__ import annotations

import torch


def lora_delta_ref(
    x: torch.Tensor, slots: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ranks: list[int]
) -> torch.Tensor:
    """Per-token LoRA delta from stacked slot buffers.

    Semantics: out[n] = B[s, :, :r] @ (A[s, :r] @ x[n]) with s = slots[n], r = ranks[s];
    out[n] = 0 where slots[n] = -1 (base only) or r = 0 (an empty slot).

    x (N, d_in), slots (N,) long, A (S, r_max, d_in), B (S, d_out, r_max) with the adapter's scale
    folded into B -> (N, d_out), in A's dtype.
    """
    out = torch.zeros(x.shape[0], B.shape[1], dtype=A.dtype, device=x.device)  # (N, out)
    for n, s in enumerate(slots.tolist()):
        if s < 0 or ranks[s] == 0:
            continue
        r = ranks[s]
        h = A[s, :r] @ x[n].to(A.dtype)  # (r,)
        out[n] = B[s, :, :r] @ h  # (out,)
    return out


def compressed_delta_ref(
    x: torch.Tensor, cidx: torch.Tensor, U: torch.Tensor, V: torch.Tensor, cores: torch.Tensor
) -> torch.Tensor:
    """Per-token delta of a compressed adapter collection (Compress then Serve, arXiv 2407.00066).

    Semantics: out[n] = U @ cores[c] @ Vᵀ @ x[n] with c = cidx[n]; out[n] = 0 where cidx[n] = -1.
    Adapter c's weight delta is ΔW_c = U · cores[c] · Vᵀ (its scale folded into the core).

    x (N, d_in), cidx (N,) long, U (d_out, R), V (d_in, R), cores (C, R, R) -> (N, d_out), in U's dtype.
    """
    out = torch.zeros(x.shape[0], U.shape[0], dtype=U.dtype, device=x.device)  # (N, out)
    for n, c in enumerate(cidx.tolist()):
        if c < 0:
            continue
        h = V.T @ x[n].to(U.dtype)  # (R,)
        out[n] = U @ (cores[c] @ h)  # (out,)
    return out
