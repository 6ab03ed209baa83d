"""Reference optimizer math: LR schedules, global-norm clipping, AdamW. Plain loops, fp32 (or fp64) state.

Conventions every stack must match (the M3 gate checks them):
- step t counts optimizer steps from 1; `lr_at(t)` is the rate used by step t;
- weight decay applies to matrices (ndim >= 2: embeddings and projections), never to norm weights;
- clipping: total = ||all grads||_2; grads *= min(1, max_norm / (total + 1e-6)) (torch's clip_grad_norm_);
- AdamW as torch.optim.AdamW: p *= 1 - lr*wd; m, v EMAs; p -= lr * m_hat / (sqrt(v_hat) + eps).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gates.case import OptimizerSpec, ScheduleSpec


def lr_at(t: int, total_steps: int, opt: OptimizerSpec, sched: ScheduleSpec) -> float:
    """Learning rate of optimizer step t (1-based).

    warmup: linear from lr/warmup to lr over `warmup_steps`;
    cosine: then cosine from lr to min_lr at `total_steps`;
    wsd (warmup-stable-decay, as MiniCPM trains): constant lr, then a linear decay to min_lr over the
    last `decay_steps` steps (default: ceil(10 %) of total_steps)."""
    lr, min_lr, warm = opt.lr, opt.min_lr, sched.warmup_steps
    if t <= warm:
        return lr * t / warm
    if sched.kind == "constant":
        return lr
    if sched.kind == "cosine":
        span = max(1, total_steps - warm)
        progress = min(1.0, (t - warm) / span)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay = sched.decay_steps if sched.decay_steps is not None else max(1, math.ceil(0.1 * total_steps))
    start = total_steps - decay
    if t <= start:
        return lr
    return lr + (min_lr - lr) * min(1.0, (t - start) / decay)


def decays(name: str, p: Tensor) -> bool:
    return p.ndim >= 2


def clip_grads_(grads: list[Tensor], max_norm: float) -> Tensor:
    """In place; returns the total norm before clipping (a 0-dim tensor)."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
    return total


def exact_norm(grads: list[Tensor]) -> Tensor:
    """||all grads||_2 of the same gradients, every square summed in float64 (a 0-dim float64 tensor): the
    float64 twin of `clip_grads_`'s total, what gates/policies.py's rule for grad norms measures it against."""
    return torch.stack([g.double().square().sum() for g in grads]).sum().sqrt()


class AdamW:
    """Holds master weights (float32, or float64 for fp64 cases) and moment estimates by parameter name."""

    def __init__(self, params: dict[str, Tensor], opt: OptimizerSpec):
        self.opt = opt
        self.master = {k: v.detach().clone() for k, v in params.items()}
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.master.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.master.items()}
        self.step_count = 0

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor], lr: float) -> None:
        b1, b2 = self.opt.betas
        self.step_count += 1
        t = self.step_count
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        for name, p in self.master.items():
            g = grads[name]
            if decays(name, p) and self.opt.weight_decay:
                p.mul_(1 - lr * self.opt.weight_decay)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / bc2).sqrt_().add_(self.opt.eps)
            p.addcdiv_(m, denom, value=-lr / bc1)

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"master.{k}": v for k, v in self.master.items()}
        out |= {f"exp_avg.{k}": v for k, v in self.exp_avg.items()}
        out |= {f"exp_avg_sq.{k}": v for k, v in self.exp_avg_sq.items()}
        out["step_count"] = torch.tensor(self.step_count)
        return out

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        for k in self.master:
            self.master[k].copy_(sd[f"master.{k}"])
            self.exp_avg[k].copy_(sd[f"exp_avg.{k}"])
            self.exp_avg_sq[k].copy_(sd[f"exp_avg_sq.{k}"])
        self.step_count = int(sd["step_count"])
