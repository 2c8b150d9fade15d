"""EfficientDM's data-free distillation (train/efficientdm.py) on a tiny UNet: a 2-bit student follows the
full-precision teacher along the teacher's own DDIM trajectories from noise, and its loss falls."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.methods.lowrank.efficientdm import Efficientdm
from lorakit.testing import tiny_unet
from lorakit.train.efficientdm import ddim_timesteps, distill

CONVS = ["conv_in", "down", "mid", "up", "conv_out"]


def student_of(teacher: torch.nn.Module, **opts) -> torch.nn.Module:
    torch.manual_seed(0)
    return lk.attach(copy.deepcopy(teacher), lk.method_config("efficientdm", r=4, **opts), targets=CONVS)


def test_the_distillation_loss_falls_on_a_tiny_unet():
    teacher = tiny_unet(seed=0)
    student = student_of(teacher, bits=2, timesteps=10)
    frozen = {n: p.clone() for n, p in student.named_parameters() if not p.requires_grad}
    result = distill(teacher, student, (4, 3, 8, 8), steps=10, rounds=10, lr=1e-3)
    assert len(result.losses) == 10 and result.before > 0
    assert result.after < 0.5 * result.before  # measured: 4.0e-3 -> 1.5e-3
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if not p.requires_grad)
    adapters = [m for m in student.modules() if isinstance(m, Efficientdm)]
    assert len(adapters) == 5 and all(float(a.B.detach().abs().sum()) > 0 for a in adapters)
    # every DDIM step had its own step sizes, and each set trained
    assert all(not torch.equal(a.step[t], a.step[0]) for a in adapters for t in range(1, 10))


def test_distill_checks_its_inputs():
    teacher = tiny_unet(seed=0)
    with pytest.raises(lk.ConfigError, match="the student has none"):
        distill(teacher, copy.deepcopy(teacher), (1, 3, 8, 8))
    student = student_of(teacher)
    with pytest.raises(lk.ConfigError, match="0 < steps <= train_steps"):
        distill(teacher, student, (1, 3, 8, 8), steps=0)
    with pytest.raises(lk.ConfigError, match="shares parameters with the teacher"):
        distill(student, student, (1, 3, 8, 8))
    assert ddim_timesteps(4, 1000) == [750, 500, 250, 0]
