"""continual(): three toy tasks (records over disjoint token ranges) trained in order with pearl on tiny_llama —
rehearsal-free (each run sees only its own task's records), earlier adapter dirs bit-identical after later tasks,
each task's ranks summing to the budget and growing with the distances measured against the previous task."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json

import pytest
import torch

import lorakit as lk
import lorakit.train.continual as continual_module
from lorakit.errors import ConfigError
from lorakit.testing import tiny_llama
from lorakit.train.continual import continual
from lorakit.train.data import Record
from lorakit.train.loop import TrainConfig
from tests.helpers import logits, tokens

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
TARGETS = ["q_proj", "v_proj", "up_proj"]
X = tokens(batch=2, length=10, seed=5)
RANGES = [(4, 60), (100, 160), (200, 256)]  # each task's token distribution


def task(t: int) -> list[Record]:
    low, high = RANGES[t]
    rows = torch.randint(low, high, (12, 10), generator=torch.Generator().manual_seed(t)).tolist()
    return [Record(r, r) for r in rows]


def digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tiny_llama(0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tasks = [task(t) for t in range(3)]
    out = tmp_path_factory.mktemp("cl")
    seen: list[list[Record]] = []
    specs: list[str] = []
    hashes: list[dict[int, dict[str, str]]] = []  # after each task: dir index -> file hashes
    outputs: list[torch.Tensor] = []
    real_train, real_save = continual_module.train, continual_module.save_adapter

    def train(model, records, cfg, **kwargs):
        seen.append(list(records))
        specs.append(cfg.callbacks[-1])
        return real_train(model, records, cfg, **kwargs)

    def save(model, path, *args):
        done = real_save(model, path, *args)
        outputs.append(logits(model, X))
        hashes.append({t: digest(out / f"task_{t}") for t in range(len(outputs))})
        return done

    cfg = TrainConfig(steps=8, batch_size=4, lr=0.01, schedule="constant", seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(continual_module, "train", train)
        mp.setattr(continual_module, "save_adapter", save)
        results = continual(base, tasks, out_dir=out, budget=12, r=4, probe=3, targets=TARGETS, config=cfg)
    return base, before, tasks, seen, hashes, outputs, results, specs


def test_each_task_trains_only_on_its_own_records(run):
    _, _, tasks, seen, _, _, results, _ = run
    assert len(seen) == len(results) == 3
    for t in range(3):
        assert seen[t] == tasks[t]
        low, high = RANGES[t]
        assert all(low <= i < high for r in seen[t] for i in r.input_ids)


def test_earlier_adapter_dirs_stay_bit_identical_and_the_base_is_untouched(run, tmp_path):
    base, before, _, _, hashes, outputs, results, _ = run
    for t in range(3):
        for later in range(t, 3):
            assert hashes[later][t] == hashes[t][t]
        assert digest(results[t].path) == hashes[t][t]
        loaded = lk.load_adapter(copy.deepcopy(base), results[t].path)
        torch.testing.assert_close(logits(loaded, X), outputs[t], atol=1e-6, rtol=0)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])
    assert len({json.dumps(h[len(h) - 1]) for h in hashes}) == 3  # three different adapters


def test_ranks_sum_to_the_budget_and_grow_with_the_distance_to_the_previous_task(run):
    _, _, _, _, _, _, results, _ = run
    patterns = []
    for res in results:
        assert sum(res.ranks.values()) == 12 and set(res.distances) == set(res.ranks)
        for a, b in itertools.permutations(res.ranks, 2):
            if res.distances[a] > res.distances[b]:
                assert res.ranks[a] >= res.ranks[b]
        patterns.append(tuple(res.ranks.values()))
    assert any(len(set(p)) > 1 for p in patterns)  # distances differ between modules, so do the ranks
    saved = json.loads((results[2].path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] or len(set(patterns[2])) == 1


def test_the_reference_of_task_t_is_task_t_minus_1(run):
    """Task 0 has no reference (the base weights); task t's pearl reads task t−1's saved dir; each run's report
    holds the distances and ranks it set."""
    _, _, _, _, _, _, results, specs = run
    assert "reference" not in specs[0]
    for t in (1, 2):
        assert specs[t].endswith(f"reference={results[t - 1].path}")
    reports = [json.loads((r.path.parent / f"run_{t}" / "pearl.json").read_text()) for t, r in enumerate(results)]
    assert [rep["distances"] for rep in reports] == [r.distances for r in results]
    assert all(rep["ranks"] == r.ranks for rep, r in zip(reports, results, strict=True))


def test_bad_input_is_a_clear_error(tmp_path):
    base = tiny_llama(0)
    with pytest.raises(ConfigError, match="at least one task"):
        continual(base, [task(0), []], out_dir=tmp_path / "a", budget=6, r=2, targets=TARGETS)
    (tmp_path / "b" / "task_0").mkdir(parents=True)
    with pytest.raises(ConfigError, match="never overwritten"):
        continual(base, [task(0)], out_dir=tmp_path / "b", budget=6, r=2, targets=TARGETS)
    cfg = TrainConfig(steps=4, batch_size=2)
    with pytest.raises(ConfigError, match="exceeds the attached capacity"):
        continual(base, [task(0)], out_dir=tmp_path / "c", budget=99, r=2, probe=2, targets=TARGETS, config=cfg)
