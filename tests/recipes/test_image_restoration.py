"""The image-restoration recipe (PAPERS.md #105, CoLoRA): it consumes the colora callback's rank pattern (the
adapted model's per-module ranks, read off its tensors, equal the pattern and sum to the budget); adapting to the new
degradation restores better than the degraded input and the pretrained model (PSNR computed on held-out images);
the uniform and CoLoRA rows spend the same total rank; a seed fixes every number. Whether CoLoRA beats uniform LoRA
is not asserted: at this size the two land within about 0.05 dB of each other (seeds 0-3), either way round."""

from __future__ import annotations

import pytest
import torch

from lorakit.inject import active_layers
from lorakit.recipes.image_restoration import (
    Recipe,
    Restorer,
    blur,
    noise,
    pairs,
    patches,
    restore_demo,
    synthetic_images,
    with_lora,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SMALL = Recipe(train_images=32, test_images=8, pretrain_steps=60, adapt_steps=20, warmup=4)


@pytest.fixture(scope="module")
def demo():
    return restore_demo(seed=0)


def test_the_synthetic_data_is_seeded_in_range_and_each_degradation_changes_it():
    images = synthetic_images(4, seed=3)
    assert images.shape == (4, 16, 16) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, synthetic_images(4, seed=3), rtol=0, atol=0)
    assert not torch.equal(images, synthetic_images(4, seed=4))
    assert patches(images).shape == (16, 64)
    for degrade in (noise(0.1), blur()):
        degraded, clean = pairs(images, degrade, seed=0)
        assert degraded.shape == clean.shape == (16, 64) and not torch.allclose(degraded, clean, atol=1e-3)


def test_the_recipe_consumes_the_colora_rank_pattern(demo):
    pattern, budget = demo["rank_pattern"], demo["budget"]
    modules = [n for n, m in Restorer().named_modules() if isinstance(m, torch.nn.Linear)]
    assert list(pattern) == modules and sum(pattern.values()) == budget and min(pattern.values()) >= 1
    assert demo["ranks"]["colora"] == pattern  # read off the fine-tuned model
    adapted = with_lora(Restorer(), pattern, scale=2.0, seed=0)
    shapes = {name: (a.A.shape[0], a.B.shape[1], a.config.scale) for name, _, a in active_layers(adapted)}
    assert shapes == {name: (r, r, 2.0) for name, r in pattern.items()}


def test_uniform_and_colora_spend_the_same_total_rank(demo):
    uniform, colora = demo["ranks"]["uniform"], demo["ranks"]["colora"]
    assert set(uniform) == set(colora) and len(set(uniform.values())) == 1
    assert sum(uniform.values()) == sum(colora.values()) == demo["budget"]


def test_adapting_to_the_new_degradation_beats_the_input_and_the_pretrained_model(demo):
    db = demo["psnr"]
    for row in ("uniform", "colora"):
        assert db[row] > db["degraded"] + 0.3 and db[row] > db["pretrained"] + 0.3, db
    assert db["pretrained_on_source"] > 20 + 3, db  # the pretrained model does denoise (σ=0.1 input is ~20 dB)


def test_a_seed_fixes_every_number():
    first, again, other = restore_demo(1, SMALL), restore_demo(1, SMALL), restore_demo(2, SMALL)
    assert first == again
    assert first["psnr"] != other["psnr"]
