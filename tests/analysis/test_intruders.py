"""Intruder dimensions (arXiv:2410.21228): planted intruders are counted exactly; PEFT parity on the same weights."""

from __future__ import annotations

import re

import pytest
import torch

from lorakit.analysis.intruders import find_intruders, intruder_dimensions, top_vectors
from lorakit.errors import ConfigError

OUT, IN = 64, 48  # out > in: W0's left singular vectors span a 48-dim subspace, leaving 16 orthogonal directions


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))[0]


def _base(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 = U diag(s) Vᵀ with a known SVD (s from 10 down to 1) and Q: 16 unit vectors orthogonal to col(U)."""
    full = _orthonormal(OUT, OUT, seed)
    U, Q = full[:, :IN], full[:, IN:]  # (64, 48), (64, 16)
    V = _orthonormal(IN, IN, seed + 1)  # (48, 48)
    s = torch.linspace(10.0, 1.0, IN)
    return U @ torch.diag(s) @ V.T, U, V, Q


def _plant(W0: torch.Tensor, Q: torch.Tensor, V: torch.Tensor, n: int, *, along_v: bool) -> torch.Tensor:
    """W0 + Σ_j σ_j q_j v_jᵀ with q_j ⊥ col(W0) and σ_j = 40..(40+10n) above every σ of W0."""
    W = W0.clone()
    g = torch.Generator().manual_seed(7)
    for j in range(n):
        v = V[:, IN - 1 - j] if along_v else torch.nn.functional.normalize(torch.randn(IN, generator=g), dim=0)
        W += (40.0 + 10 * j) * torch.outer(Q[:, j], v)
    return W


@pytest.mark.parametrize("n", [1, 3, 5])
def test_planted_intruders_along_base_directions_are_counted_exactly(n):
    W0, U, V, Q = _base()
    # along W0's weakest right singular vectors the SVD of W_ft is known: σ_j q_j + s u_k mixes by s/σ_j < 0.03
    found = intruder_dimensions(W0, _plant(W0, Q, V, n, along_v=True), top_k=10, threshold=0.5)
    assert found.count == n and found.indices == list(range(n))  # the planted σ_j are the largest
    assert max(found.max_cos[:n]) < 0.03 and min(found.max_cos[n:]) > 0.99


@pytest.mark.parametrize("n", [2, 4])
def test_planted_intruders_with_random_input_directions_are_counted_exactly(n):
    W0, U, V, Q = _base(seed=3)
    found = intruder_dimensions(W0, _plant(W0, Q, V, n, along_v=False), top_k=10, threshold=0.5)
    assert found.count == n and sorted(found.indices) == list(range(n))


def test_a_small_full_ft_like_perturbation_has_no_intruders():
    W0, U, V, Q = _base(seed=5)
    noise = 1e-3 * torch.randn(OUT, IN, generator=torch.Generator().manual_seed(11))
    found = intruder_dimensions(W0, W0 + noise, top_k=10, threshold=0.5)
    assert found.count == 0 and min(found.max_cos) > 0.99


def test_the_threshold_decides():
    W0, U, V, Q = _base()
    W = W0.clone()
    W += 40.0 * torch.outer((Q[:, 0] + U[:, IN - 1]) / 2**0.5, V[:, IN - 1])  # |cos| ≈ 0.707 with u_48
    assert intruder_dimensions(W0, W, top_k=3, threshold=0.5).count == 0
    assert intruder_dimensions(W0, W, top_k=3, threshold=0.75).count == 1


def test_top_vectors_match_the_svd_up_to_sign():
    for shape in [(64, 48), (48, 64), (30, 30)]:
        W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        U = torch.linalg.svd(W.double(), full_matrices=False)[0][:, :5]
        cos = (top_vectors(W, 5).double().T @ U).abs().diagonal()
        torch.testing.assert_close(cos, torch.ones(5, dtype=torch.float64), atol=1e-5, rtol=0)


def test_bad_settings_are_config_errors():
    W0, U, *_ = _base()
    with pytest.raises(ConfigError, match="top_k"):
        find_intruders(U, W0, top_k=0)
    with pytest.raises(ConfigError, match="threshold"):
        find_intruders(U, W0, threshold=1.5)


def test_counts_match_peft_reduce_intruder_dimension(tmp_path):
    """Same tiny Llama + LoRA weights: lk.analyze's per-module counts equal what PEFT's mitigation detects."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    import lorakit as lk
    from lorakit.io.adapter import PREFIX
    from lorakit.testing import tiny_llama

    base_dir = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # deltas from negligible to dominant, so counts range over 0..r
        for i, (name, p) in enumerate(sorted(peft_model.named_parameters())):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_A" in name else 0.05 * (i % 7)))
    peft_model.save_pretrained(tmp_path / "adapter")

    lines: list[str] = []
    reduce_intruder_dimension(peft_model, top_k=10, threshold_epsilon=0.5, logging_sink=lines.append)
    peft_counts = {}
    for line in lines:
        found = re.match(r"(\S+): (No intruders|Intruders: (\d+))$", line)
        if found:
            peft_counts[found.group(1).removeprefix(PREFIX)] = int(found.group(3) or 0)

    report = lk.analyze(tmp_path / "adapter", base=base_dir, top_k=10, threshold=0.5)
    ours = {m.module: m.intruders.count for m in report.modules}
    assert ours == peft_counts
    assert len(ours) == 14 and sum(ours.values()) > 0 and min(ours.values()) == 0
