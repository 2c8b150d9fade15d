"""Each merge method on plain tensors: its defining formula, a straightforward reference, PEFT's merge_utils."""

from __future__ import annotations

import pytest
import torch

from lorakit.compose import MERGE_METHODS, merge_module
from lorakit.compose._api import factorize, keep_rank, refactor
from lorakit.compose.ortho_dropout import masked_sum, owners
from lorakit.errors import ConfigError
from lorakit.methods._api import LoraFactors

merge_utils = pytest.importorskip("peft.utils.merge_utils")

OUT, IN = 12, 10


def factors(seed: int, r: int = 3, scale: float = 2.0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g), scale)


def deltas(k: int = 3) -> list[torch.Tensor]:
    return [f.scale * f.B @ f.A for f in (factors(s, r=2 + s) for s in range(k))]


def product(f: LoraFactors) -> torch.Tensor:
    return f.scale * f.B @ f.A


def trim_reference(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries whose |x| reaches the k-th largest magnitude (magnitudes are distinct here)."""
    k = int(density * t.numel())
    threshold = t.abs().reshape(-1).sort(descending=True).values[k - 1]
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def ties_reference(tasks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Entry by entry: elect the sign of Σ w_i τ_i, average the agreeing w_i τ_i over their Σ w_i."""
    out = torch.zeros_like(tasks[0])
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            values = [float(t[i, j]) for t in tasks]
            sign = 1.0 if sum(w * v for w, v in zip(weights, values, strict=True)) >= 0 else -1.0
            agree = [(w, v) for w, v in zip(weights, values, strict=True) if v != 0 and (v > 0) == (sign > 0)]
            if agree:
                out[i, j] = sum(w * v for w, v in agree) / sum(w for w, _ in agree)
    return out


def run(name: str, tasks: list[torch.Tensor], weights: list[float], **opts) -> torch.Tensor:
    return MERGE_METHODS[name].fn(tasks, weights, **opts)


def test_linear_cat_and_task_arithmetic_are_the_exact_weighted_sum():
    fs, w = [factors(0), factors(1, r=5, scale=0.5), factors(2, r=1)], [1.0, -0.5, 2.0]
    expected = sum(wi * product(f) for wi, f in zip(w, fs, strict=True))
    for name, lam in (("linear", 1.0), ("cat", 1.0), ("task_arithmetic", 0.3)):
        opts = {"lam": lam} if name == "task_arithmetic" else {}
        merged = merge_module(MERGE_METHODS[name], fs, w, options=opts)
        assert merged.A.shape == (9, IN) and merged.B.shape == (OUT, 9)  # rank Σ r_i
        torch.testing.assert_close(product(merged), lam * expected, rtol=0, atol=1e-5)


def test_exact_concatenation_past_full_rank_is_capped_without_loss():
    fs, w = [factors(0, r=6), factors(1, r=6)], [1.0, -1.0]  # Σ r = 12 > min(OUT, IN) = 10
    merged = merge_module(MERGE_METHODS["linear"], fs, w)
    assert merged.A.shape[0] == IN
    torch.testing.assert_close(product(merged), product(fs[0]) - product(fs[1]), rtol=1e-5, atol=1e-5)


def test_cat_puts_weight_and_scale_in_A_like_peft():
    fs, w = [factors(0), factors(1, r=2, scale=0.5)], [0.7, 1.5]
    merged = MERGE_METHODS["cat"].fn(fs, w)
    torch.testing.assert_close(merged.A, torch.cat([0.7 * 2.0 * fs[0].A, 1.5 * 0.5 * fs[1].A]))
    torch.testing.assert_close(merged.B, torch.cat([fs[0].B, fs[1].B], 1))


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_is_the_best_rank_r_approximation_of_the_weighted_sum(rank):
    fs, w = [factors(0), factors(1, r=4), factors(2, r=2)], [1.0, 0.5, -1.5]
    total = sum(wi * product(f) for wi, f in zip(w, fs, strict=True))
    U, S, Vh = torch.linalg.svd(total)
    best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]  # Eckart–Young
    merged = merge_module(MERGE_METHODS["svd"], fs, w, rank=rank)
    assert merged.A.shape[0] == rank
    assert float((product(merged) - best).norm() / best.norm()) < 1e-5


def test_svd_default_rank_is_the_largest_input_rank_like_peft():
    merged = merge_module(MERGE_METHODS["svd"], [factors(0, r=2), factors(1, r=5)], [1.0, 1.0])
    assert merged.A.shape[0] == 5


def test_energy_keeps_the_fewest_singular_values_reaching_the_fraction():
    total = sum(deltas(3))
    S = torch.linalg.svdvals(total)
    cum = torch.cumsum(S**2, 0) / (S**2).sum()
    for energy in (0.5, 0.9, 0.99, 1.0):
        k = keep_rank(S, None, energy)
        assert cum[k - 1] >= energy - 1e-9 and (k == 1 or cum[k - 2] < energy)
        assert factorize(total, energy=energy).A.shape[0] == k
    assert factorize(torch.zeros(OUT, IN), energy=0.9).A.shape[0] == 1  # a zero delta keeps one zero direction


def test_refactor_from_factors_equals_the_svd_of_the_product():
    f = LoraFactors(torch.randn(7, IN), torch.randn(OUT, 7), 0.5)
    for k in (2, 7):
        fast, slow = refactor(f, k), factorize(product(f), k)
        torch.testing.assert_close(product(fast), product(slow), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_ties_matches_a_reference_of_its_definition(density):
    tasks, w = deltas(3), [1.0, 0.4, 2.0]
    expected = ties_reference([trim_reference(t, density) for t in tasks], w)
    torch.testing.assert_close(run("ties", tasks, w, density=density), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_ties_equals_peft_ties_with_unit_weights(density):
    """Where the definitions coincide (all weights 1: PEFT elects signs on unweighted mass and divides by counts)."""
    tasks, w = deltas(3), [1.0, 1.0, 1.0]
    peft_out = merge_utils.ties(tasks, torch.tensor(w), density, "total")
    torch.testing.assert_close(run("ties", tasks, w, density=density), peft_out)


def test_ties_of_k_copies_with_weights_one_over_k_returns_the_trimmed_task():
    t = deltas(1)[0]
    out = run("ties", [t, t, t, t], [0.25] * 4, density=0.4)
    torch.testing.assert_close(out, trim_reference(t, 0.4))


def test_magnitude_prune_matches_reference_and_peft():
    tasks, w = deltas(3), [1.0, -0.5, 2.0]
    expected = sum(wi * trim_reference(t, 0.4) for wi, t in zip(w, tasks, strict=True))
    out = run("magnitude_prune", tasks, w, density=0.4)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, merge_utils.magnitude_prune(tasks, torch.tensor(w), 0.4))


def test_task_arithmetic_matches_peft_on_the_deltas():
    fs, w = [factors(0), factors(1, r=2)], [0.8, -1.2]
    merged = merge_module(MERGE_METHODS["task_arithmetic"], fs, w, options={"lam": 0.5})
    peft_out = merge_utils.task_arithmetic([product(f) for f in fs], torch.tensor(w))
    torch.testing.assert_close(product(merged), 0.5 * peft_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_with_the_same_masks(name):
    """Masks aligned exactly: PEFT draws from the global generator, lorakit from its own seeded one; same seed,
    same draw order (task by task), same masks."""
    tasks, w = deltas(3), [1.0, 1.0, 1.0]  # unit weights: where dare_ties' definitions coincide
    ours = run(name, tasks, w, density=0.6, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    theirs = getattr(merge_utils, name)(tasks, torch.tensor(w), 0.6, *(["total"] if name == "dare_ties" else []))
    torch.testing.assert_close(ours, theirs)


def test_dare_linear_matches_a_reference_with_explicit_masks():
    """Reference from the definition: draw a keep-mask per task (p = density), rescale by 1/p, weighted sum."""
    tasks, w, p = deltas(3), [1.0, 0.3, -2.0], 0.4
    ours = run("dare_linear", tasks, w, density=p, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    drawn = [torch.bernoulli(torch.full_like(t, p), generator=g).bool() for t in tasks]
    expected = sum(wi * torch.where(m, t / p, torch.zeros_like(t)) for wi, t, m in zip(w, tasks, drawn, strict=True))
    torch.testing.assert_close(ours, expected)
    kept = (ours != 0).float().mean()
    assert 0.4 < float(kept) < 0.95  # union of three masks of density 0.4: 1 - 0.6³ ≈ 0.78 expected


def test_dare_is_unbiased():
    """E[m ⊙ ΔW / p] = ΔW: the mean of many seeded merges approaches the plain weighted sum."""
    tasks, w = deltas(2), [1.0, 0.5]
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([run("dare_linear", tasks, w, density=0.5, generator=g) for _ in range(3000)]).mean(0)
    plain = tasks[0] + 0.5 * tasks[1]
    assert float((mean - plain).norm() / plain.norm()) < 0.05


def test_breadcrumbs_keeps_the_middle_magnitude_band():
    tasks, w, density, gamma = deltas(2), [1.0, 0.5], 0.5, 0.1
    expected = torch.zeros_like(tasks[0])
    for wi, t in zip(w, tasks, strict=True):
        ordered = t.abs().reshape(-1).sort(descending=True).values
        top, keep = int(gamma * t.numel()), int(density * t.numel())
        upper = ordered[top - 1] if top else torch.tensor(float("inf"))
        lower = ordered[top + keep - 1]
        expected += wi * torch.where((t.abs() < upper) & (t.abs() >= lower), t, torch.zeros_like(t))
    out = run("breadcrumbs", tasks, w, density=density, gamma=gamma)
    torch.testing.assert_close(out, expected)
    assert int((out != 0).sum()) <= 2 * int(density * tasks[0].numel())


def test_ortho_dropout_outputs_are_exactly_orthogonal():
    fs, w = [factors(0), factors(1, r=2), factors(2, r=4)], [1.0, 0.5, 2.0]
    owner = owners(OUT, 3, torch.Generator().manual_seed(1))
    merged = masked_sum(fs, w, owner)
    x = torch.randn(IN, 5)  # 5 inputs
    blocks = torch.split(torch.arange(merged.A.shape[0]), [3, 2, 4])
    ys = [merged.B[:, b] @ (merged.A[b] @ x) for b in blocks]  # k outputs, each (OUT, 5)
    for i in range(3):
        for j in range(i + 1, 3):
            assert float((ys[i] * ys[j]).sum(0).abs().max()) == 0.0  # disjoint supports: exactly 0
    torch.testing.assert_close(sum(ys), product(merged) @ x)


def test_ortho_dropout_rescaled_expectation_is_the_plain_sum():
    """Uniform owners are invariant under relabelling o -> (o + c) mod k, so E[merge] equals the mean over the
    k relabellings of any one draw, in which every dimension is kept once by every adapter: exactly Σ w_i ΔW_i."""
    fs, w = [factors(0), factors(1, r=2), factors(2, r=4)], [1.0, 0.5, 2.0]
    plain = sum(wi * product(f) for wi, f in zip(w, fs, strict=True))
    owner = owners(OUT, 3, torch.Generator().manual_seed(5))
    mean = sum(product(masked_sum(fs, w, (owner + c) % 3)) for c in range(3)) / 3
    torch.testing.assert_close(mean, plain, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    sampled = torch.stack([product(MERGE_METHODS["ortho_dropout"].fn(fs, w, generator=g)) for _ in range(2000)])
    assert float((sampled.mean(0) - plain).norm() / plain.norm()) < 0.05  # Monte-Carlo check of the same


def test_unknown_method_and_option_and_density_are_config_errors(tmp_path):
    from lorakit.compose import merge_adapters

    with pytest.raises(ConfigError, match="Did you mean 'ties'"):
        merge_adapters([tmp_path], "tie", out=tmp_path / "o")
    with pytest.raises(ConfigError, match="has no option.*density"):
        merge_adapters([tmp_path], "linear", out=tmp_path / "o", density=0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="density must be in"):
            merge_adapters([tmp_path], "ties", out=tmp_path / "o", density=bad)
    with pytest.raises(ConfigError, match="density \\+ gamma"):
        merge_adapters([tmp_path], "breadcrumbs", out=tmp_path / "o", density=0.95, gamma=0.1)
