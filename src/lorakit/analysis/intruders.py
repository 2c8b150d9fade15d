"""LoRA vs Full Fine-tuning: An Illusion of Equivalence (Shuttleworth et al. 2024) — https://arxiv.org/abs/2410.21228

Intruder dimension: a left singular vector y_j, j ≤ k, of the fine-tuned W_ft = W0 + ΔW with
max_i |cos(y_j, x_i)| < ε over every left singular vector x_i of W0.

Matrices are in (out, in) orientation, so the singular vectors compared live in the output space
of every layer kind (for GPT-2 Conv1D and embeddings that is the transpose of the stored weight).
Like PEFT's ``reduce_intruder_dimension``, x_i runs over all min(out, in) singular vectors of W0
and y_j over the top ``top_k`` of W_ft; defaults (k = 10, ε = 0.5) are PEFT's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import ConfigError


@dataclass
class Intruders:
    """Intruder dimensions of one fine-tuned weight against its base."""

    count: int
    indices: list[int]  # j (0-based, by descending singular value of W_ft) of each intruder
    max_cos: list[float]  # max_i |cos(y_j, x_i)| for j < top_k
    top_k: int
    threshold: float


def check_settings(top_k: int, threshold: float) -> None:
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a positive integer (how many top singular vectors to test), got {top_k!r}.")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold must be a cosine in (0, 1] (PEFT's default is 0.5), got {threshold!r}.")


def base_vectors(W0: torch.Tensor) -> torch.Tensor:
    """U0 (out, min(out, in)): the left singular vectors of the (out, in) base weight, float32."""
    W0 = W0.float()
    if W0.shape[0] >= W0.shape[1]:
        return torch.linalg.svd(W0, full_matrices=False)[0]
    return torch.linalg.svd(W0.T, full_matrices=False)[2].T  # a tall SVD is cheaper; U of W0 = V of W0ᵀ


def top_vectors(W: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k left singular vectors (out, k) of W (out, in), from the eigenvectors of the smaller Gram matrix.

    With W Wᵀ = U Σ² Uᵀ (out ≤ in) they are its top eigenvectors; with WᵀW = V Σ² Vᵀ they are W V_k Σ_k⁻¹.
    Gram matrices are formed in float64; a rank-deficient top-k falls back to the full SVD.
    """
    Wd = W.double()
    out, inp = Wd.shape
    k = min(k, out, inp)
    evals, evecs = torch.linalg.eigh(Wd @ Wd.T if out <= inp else Wd.T @ Wd)  # ascending
    top = evals[-k:].flip(0)  # σ₁² ≥ … ≥ σ_k²
    if top[-1] <= 1e-10 * top[0]:
        return torch.linalg.svd(W.float(), full_matrices=False)[0][:, :k]
    vecs = evecs[:, -k:].flip(1)  # (out, k) or (in, k)
    U = vecs if out <= inp else (Wd @ vecs) / top.sqrt()  # (out, k)
    return U.float()


def find_intruders(U0: torch.Tensor, W_ft: torch.Tensor, *, top_k: int = 10, threshold: float = 0.5) -> Intruders:
    """Intruders among the top ``top_k`` left singular vectors of W_ft (out, in) against the base's U0."""
    check_settings(top_k, threshold)
    U_ft = top_vectors(W_ft, top_k)  # (out, k)
    max_cos = (U_ft.T @ U0).abs().amax(dim=1).clamp(max=1.0)  # (k,): best match of each y_j among all x_i
    indices = torch.nonzero(max_cos < threshold).flatten().tolist()
    return Intruders(len(indices), indices, max_cos.tolist(), top_k, threshold)


def intruder_dimensions(W0: torch.Tensor, W_ft: torch.Tensor, *, top_k: int = 10, threshold: float = 0.5) -> Intruders:
    """Intruders of W_ft (out, in) against W0 (out, in)."""
    if W0.shape != W_ft.shape:
        raise ConfigError(f"W0 {tuple(W0.shape)} and W_ft {tuple(W_ft.shape)} must have the same shape.")
    return find_intruders(base_vectors(W0), W_ft, top_k=top_k, threshold=threshold)
