"""EfficientDM's data-free distillation — https://arxiv.org/abs/2310.03270 (section 3.3)
Update rule: at each step t of the full-precision teacher's own DDIM trajectory x_T ~ N(0, I) → x_0, one optimizer
step on ‖ε_student(x_t, t) − ε_teacher(x_t, t)‖² (mean), over the LoRA factors and timestep t's LSQ step sizes.

No training images: the inputs are the teacher's denoising trajectory from Gaussian noise, so the student (the same
network with ``efficientdm`` adapters: its weights fake-quantized) learns to follow the teacher where it samples.
The student's step-size set for denoising step i of ``steps`` is ``i·G // steps`` (G = the adapters' ``timesteps``;
G = ``steps`` gives every step its own, the paper's temporal step sizes). Schedule: DDPM's linear β from 1e-4 to
0.02 over ``train_steps`` diffusion steps, sampled with ``steps`` evenly spaced deterministic DDIM steps (η = 0),
x̂_0 clipped to [−1, 1] (diffusers' ``clip_sample``, which keeps an untrained teacher's trajectory bounded). The
models are called as ``model(x_t, t)`` with t (N,) long, returning ε̂ shaped like x_t (a UNet). The paper also
quantizes activations (TALSQ: LSQ step sizes per timestep on activation quantizers); that is not done here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods.lowrank.efficientdm import Efficientdm, set_timestep


@dataclass
class DistillResult:
    """The mean distillation loss over one fixed trajectory (seed ``seed``) before and after, and each round's mean."""

    before: float
    after: float
    losses: list[float] = field(default_factory=list)  # mean loss over the trajectory, per training round


def ddim_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """The ``steps`` diffusion timesteps DDIM visits, descending (e.g. 10 of 1000: 900, 800, ..., 0)."""
    return list(range(0, train_steps, train_steps // steps))[:steps][::-1]


def _alpha_bar(train_steps: int) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, train_steps, dtype=torch.float64)  # DDPM's linear schedule
    return torch.cumprod(1 - betas, dim=0)  # (train_steps,)


def _walk(
    teacher: nn.Module,
    student: nn.Module,
    x: torch.Tensor,
    sets: list[int],
    train_steps: int,
    step: Callable[[torch.Tensor], None] | None,
) -> float:
    """Follow the teacher's DDIM trajectory from noise ``x`` (``len(sets)`` steps, step-size set ``sets[i]`` at
    step i); the student's loss at each step is handed to ``step`` (an optimizer step) or only measured. Returns
    the mean loss over the trajectory."""
    ts = ddim_timesteps(len(sets), train_steps)
    ab = _alpha_bar(train_steps).to(x.device)
    losses = []
    for i, t in enumerate(ts):
        set_timestep(student, sets[i])
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        with torch.no_grad():
            eps = teacher(x, tt)  # (N, C, H, W)
        with torch.set_grad_enabled(step is not None):
            loss = (student(x, tt).float() - eps.float()).pow(2).mean()
        if step is not None:
            step(loss)
        losses.append(float(loss.detach()))
        a, a_prev = ab[t], (ab[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=ab.dtype))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)  # the teacher's x_0, clipped to the data range
        x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(x.dtype)  # DDIM, η = 0
    return sum(losses) / len(losses)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    shape: tuple[int, ...],
    *,
    steps: int = 10,
    rounds: int = 20,
    lr: float = 1e-3,
    train_steps: int = 1000,
    seed: int = 0,
) -> DistillResult:
    """Train ``student``'s efficientdm adapters (in place) to match ``teacher`` along ``rounds`` fresh teacher
    trajectories of ``steps`` DDIM steps from noise of ``shape`` (N, C, H, W); Adam at ``lr``. ``teacher`` is the
    full-precision model, ``student`` a copy with ``lk.attach(copy, lk.method_config("efficientdm", ...))``."""
    adapters = [m for m in student.modules() if isinstance(m, Efficientdm)]
    if not adapters:
        raise ConfigError("distill trains efficientdm adapters, but the student has none; lk.attach one first.")
    if not (isinstance(steps, int) and 0 < steps <= train_steps and rounds >= 1 and lr > 0):
        raise ConfigError(f"distill needs 0 < steps <= train_steps, rounds >= 1, lr > 0; got {steps}, {rounds}, {lr}.")
    if any(p is q for p in student.parameters() for q in teacher.parameters()):
        raise ConfigError("the student shares parameters with the teacher; attach to a copy (copy.deepcopy(model)).")
    sets = [i * adapters[0].config.timesteps // steps for i in range(steps)]  # step-size set of each DDIM step
    g = torch.Generator().manual_seed(seed)
    device = next(teacher.parameters()).device
    noise = [torch.randn(shape, generator=g).to(device) for _ in range(rounds + 1)]  # [0]: the fixed eval trajectory
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)  # other timesteps' step sizes: no grad, so Adam leaves them as they are
        loss.backward()
        optimizer.step()

    before = _walk(teacher, student, noise[0], sets, train_steps, None)
    losses = [_walk(teacher, student, x, sets, train_steps, step) for x in noise[1:]]
    return DistillResult(before, _walk(teacher, student, noise[0], sets, train_steps, None), losses)
