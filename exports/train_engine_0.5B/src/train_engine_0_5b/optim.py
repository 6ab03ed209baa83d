"""Optimizer side of a step: the LR schedule, global-norm clipping, and AdamW over fp32 master weights.

Conventions (the reference's, gates/stacks/torch_ref/optim.py, which the M3 gate checks):
- optimizer step t counts from 1 and uses `Schedule.lr_at(t)`;
- weight decay applies to matrices (ndim >= 2), never to norm weights;
- clipping: total = ||all grads||_2, grads *= min(1, max_norm / (total + 1e-6)); max_norm 0 disables it;
- AdamW is torch.optim.AdamW's math, run by the registry's `adamw` op.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Schedule:
    """warmup: linear from lr/warmup to lr; cosine: then down to min_lr at total_steps; wsd
    (warmup-stable-decay, as MiniCPM trains): lr, then linear to min_lr over the last decay_steps
    (default ceil(10 %) of total_steps); constant: lr after warmup."""

    kind: Literal["wsd", "cosine", "constant"]
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    decay_steps: int | None = None

    def lr_at(self, t: int) -> float:
        lr, min_lr, warm = self.lr, self.min_lr, self.warmup_steps
        if t <= warm:
            return lr * t / warm
        if self.kind == "constant":
            return lr
        if self.kind == "cosine":
            progress = min(1.0, (t - warm) / max(1, self.total_steps - warm))
            return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        decay = self.decay_steps if self.decay_steps is not None else max(1, math.ceil(0.1 * self.total_steps))
        start = self.total_steps - decay
        if t <= start:
            return lr
        return lr + (min_lr - lr) * min(1.0, (t - start) / decay)


def global_norm(grads: list[Tensor]) -> Tensor:
    """||all grads||_2 as a 0-dim tensor, computed in at least fp32 whatever the gradients' dtype
    (multi-tensor: a few launches, not one per grad)."""
    acc = torch.promote_types(grads[0].dtype, torch.float32)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=acc)))


def clip_coefficient(total: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / (total + 1e-6)), as torch's clip_grad_norm_; stays on the device."""
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def clip_grads_(grads: list[Tensor], max_norm: float) -> Tensor:
    """In place; returns the total norm before clipping (0-dim)."""
    total = global_norm(grads)
    if max_norm > 0:
        torch._foreach_mul_(grads, clip_coefficient(total, max_norm))
    return total


def fuses_clip_and_copy(adamw_op: Callable) -> bool:
    """Whether an `adamw` implementation takes `clip_coef` and `param_copies` (ops/adamw/triton_fused.py):
    it then scales the gradients as it reads them and writes the compute-dtype parameters in its own
    pass, and reads gradients of any float dtype, so the step needs no clip pass and no copy pass."""
    names = inspect.signature(adamw_op).parameters
    return "clip_coef" in names and "param_copies" in names


class AdamW:
    """Master weights, moments and the step count, by parameter (model order).

    Where the model computes in the master dtype (fp32 on a CPU) the master weight IS the parameter;
    otherwise (bf16 on a GPU) the master is a separate fp32 copy, written back after every step.
    `step` clips and updates: with an op that `fuses_clip_and_copy` that is one norm and one AdamW pass
    (the clip factor and the bf16 write-back inside it); otherwise clip pass, AdamW, copy pass."""

    def __init__(
        self, params: dict[str, nn.Parameter], master: dict[str, Tensor], *, adamw_op: Callable, betas: tuple[float, float],
        eps: float, weight_decay: float, master_dtype: torch.dtype,
    ):  # fmt: skip
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.shared = all(p.dtype == master_dtype for p in self.params)
        with torch.no_grad():
            if self.shared:
                for p, n in zip(self.params, self.names):
                    p.copy_(master[n])
                self.master = [p.data for p in self.params]
            else:
                self.master = [master[n].to(p.device, master_dtype, copy=True) for p, n in zip(self.params, self.names)]
                torch._foreach_copy_(self.params, self.master)
        self.exp_avg = [torch.zeros_like(m) for m in self.master]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.master]
        self.weight_decays = [weight_decay if p.ndim >= 2 else 0.0 for p in self.params]
        self.betas, self.eps, self.op = betas, eps, adamw_op
        self.fused = fuses_clip_and_copy(adamw_op)
        self.step_count = 0

    @torch.no_grad()
    def step(self, grads: list[Tensor], lr: float, max_norm: float) -> Tensor:
        """Clip `grads` to global norm `max_norm` (0: no clipping), one AdamW step at `lr`; returns the
        norm before clipping (0-dim, on the device). With a fused op the gradients are left unchanged and
        may be in the compute dtype; otherwise they are clipped in place and must be in the master dtype."""
        self.step_count += 1
        kw = dict(step=self.step_count, lr=lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                  weight_decays=self.weight_decays)
        if self.fused:
            norm = global_norm(grads)
            coef = clip_coefficient(norm, max_norm) if max_norm > 0 else None
            self.op(self.master, grads, self.exp_avg, self.exp_avg_sq, **kw, clip_coef=coef,
                    param_copies=None if self.shared else [p.data for p in self.params])
            return norm
        norm = clip_grads_(grads, max_norm)
        self.op(self.master, grads, self.exp_avg, self.exp_avg_sq, **kw)
        if not self.shared:
            torch._foreach_copy_(self.params, self.master)
        return norm

    def master_weights(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.master))

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"exp_avg.{n}": t for n, t in zip(self.names, self.exp_avg)}
        return out | {f"exp_avg_sq.{n}": t for n, t in zip(self.names, self.exp_avg_sq)}

    @torch.no_grad()
    def load(self, master: dict[str, Tensor], state: dict[str, Tensor], step_count: int) -> None:
        for n, m, a, s in zip(self.names, self.master, self.exp_avg, self.exp_avg_sq):
            m.copy_(master[n])
            a.copy_(state[f"exp_avg.{n}"])
            s.copy_(state[f"exp_avg_sq.{n}"])
        if not self.shared:
            torch._foreach_copy_(self.params, self.master)
        self.step_count = step_count
