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

from .tensor_parallel import is_sharded, local, shard_of, whole


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
    (the clip factor and the bf16 write-back inside it); otherwise clip pass, AdamW, copy pass.

    After `shard` (ZeRO-1) it keeps masters and moments only for this rank's pieces of the parameters
    (dist.Piece), takes those pieces' gradients, and writes those pieces of the parameters; the norm is
    summed over ranks. `master_weights` / `state_tensors` / `load` speak whole tensors (probes, checkpoints
    of formats 1-2), assembling them across ranks: every rank must call them. Checkpoints save and load
    each rank's own pieces (sharded_state.py).

    Tensor-parallel parameters (DTensors): everything above acts on each rank's local shard
    (tensor_parallel.py); after `tensor_parallel(tp)` the norm sums the squares of sharded gradients over the
    TP group and counts replicated ones once."""

    def __init__(
        self, params: dict[str, nn.Parameter], master: dict[str, Tensor], *, adamw_op: Callable, betas: tuple[float, float],
        eps: float, weight_decay: float, master_dtype: torch.dtype,
    ):  # fmt: skip
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.shared = all(p.dtype == master_dtype for p in self.params)
        self.master_dtype = master_dtype
        with torch.no_grad():
            mine = [shard_of(master[n], p) for p, n in zip(self.params, self.names)]
            if self.shared:
                for p, m in zip(self.params, mine):
                    local(p).copy_(m)
                self.master = [local(p) for p in self.params]
            else:
                self.master = [m.to(local(p).device, master_dtype, copy=True) for p, m in zip(self.params, mine)]
                torch._foreach_copy_([local(p) for p in self.params], self.master)
        # The update's units: whole parameters, or after `shard` this rank's pieces, `units` then naming
        # each one's (name, start, end) in the flattened parameter; `_copies()` are their compute-dtype targets.
        self.exp_avg = [torch.zeros_like(m) for m in self.master]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.master]
        self._decay = {n: weight_decay if p.ndim >= 2 else 0.0 for n, p in zip(self.names, self.params)}
        self.weight_decays = [self._decay[n] for n in self.names]
        self.units: list[tuple[str, int, int]] | None = None  # None: whole parameters (local shards)
        self.ctx = None
        self.tp = None  # tensor_parallel(): the TP group's DistContext
        self._tp_sharded = [is_sharded(p) for p in self.params]  # per unit: its squares are summed over TP
        self._tp_split: list[Tensor] | None = None
        self.betas, self.eps, self.op = betas, eps, adamw_op
        self.fused = fuses_clip_and_copy(adamw_op)
        self.step_count = 0

    def _copies(self) -> list[Tensor]:
        if self.units is None:
            return [local(p) for p in self.params]
        return self._piece_params

    @torch.no_grad()
    def shard(self, pieces: list, ctx) -> None:
        """ZeRO-1: from now on update only `pieces` (dist.Piece, this rank's, their parameters already
        re-pointed at the reducer's flat buffers); masters and moments are cut down to them."""
        index = {n: i for i, n in enumerate(self.names)}
        cut = lambda ts: [ts[index[pc.name]].reshape(-1)[pc.start : pc.end].clone() for pc in pieces]  # noqa: E731
        self._piece_params = [pc.param for pc in pieces]
        self.master = list(self._piece_params) if self.shared else cut(self.master)
        self.exp_avg, self.exp_avg_sq = cut(self.exp_avg), cut(self.exp_avg_sq)
        self.weight_decays = [self._decay[pc.name] for pc in pieces]
        self._tp_sharded = [self._tp_sharded[index[pc.name]] for pc in pieces]
        self._tp_split = None
        self.units = [(pc.name, pc.start, pc.end) for pc in pieces]
        self.ctx = ctx

    def tensor_parallel(self, tp) -> None:
        """The parameters are DTensors over the TP group `tp` (a DistContext): the norm then reduces over it."""
        self.tp = tp if tp is not None and tp.world > 1 else None

    def _norm(self, grads: list[Tensor]) -> Tensor:
        if self.tp is not None:
            return self._tp_norm(grads)
        if self.units is None:
            return global_norm(grads)
        acc = torch.promote_types(grads[0].dtype, torch.float32) if grads else self.master_dtype
        sq = torch.stack(torch._foreach_norm(grads, 2, dtype=acc)).square().sum() if grads else None
        device = self.params[0].device
        return self.ctx.all_reduce_sum_(sq if sq is not None else torch.zeros((), dtype=acc, device=device)).sqrt()

    def _tp_norm(self, grads: list[Tensor]) -> Tensor:
        """Squares of TP-sharded units summed over the TP group, replicated ones counted once; both summed over
        the DP group under ZeRO-1 (each rank holds its pieces only)."""
        acc = torch.promote_types(grads[0].dtype, torch.float32) if grads else self.master_dtype
        device = local(self.params[0]).device
        sq = torch.zeros(2, dtype=acc, device=device)  # [sharded, replicated]
        if grads:
            if self._tp_split is None:  # unit indices of each kind, on the device once
                self._tp_split = [torch.tensor([i for i, s in enumerate(self._tp_sharded) if s == want], dtype=torch.long,
                                               device=device) for want in (True, False)]
            norms = torch.stack(torch._foreach_norm(grads, 2, dtype=acc)).square()
            sq = torch.stack([norms.index_select(0, idx).sum() for idx in self._tp_split])
        if self.units is not None:
            self.ctx.all_reduce_sum_(sq)
        self.tp.all_reduce_sum_(sq[:1])
        return sq.sum().sqrt()

    @torch.no_grad()
    def grad_norm(self, grads: list[Tensor]) -> Tensor:
        """The global norm of `grads` (one per unit; a collective under ZeRO-1: every rank calls it)."""
        return self._norm(grads)

    @torch.no_grad()
    def step(self, grads: list[Tensor], lr: float | Tensor, max_norm: float, *, step: Tensor | None = None,
             norm: Tensor | None = None) -> Tensor:
        """Clip `grads` (one per unit) to global norm `max_norm` (0: no clipping), one AdamW step at `lr`;
        returns the norm before clipping (0-dim, on the device). With a fused op the gradients are left
        unchanged and may be in the compute dtype; otherwise they are clipped in place and must be in the
        master dtype. A fused op also takes `lr` and `step` (this step's count, from 1) as 0-dim fp64
        device tensors that the caller keeps current, so that nothing of the step is read on the host (a
        CUDA graph replays it: cuda_graph.py); `step_count` still counts on the host. `norm`: `grad_norm(grads)`
        if the caller has it already."""
        self.step_count += 1
        if (isinstance(lr, Tensor) or step is not None) and not self.fused:
            raise ValueError("device-tensor lr / step need an adamw op that fuses clipping and the copy (triton_fused)")
        kw = dict(step=self.step_count if step is None else step, lr=lr, beta1=self.betas[0], beta2=self.betas[1],
                  eps=self.eps, weight_decays=self.weight_decays)
        norm = self._norm(grads) if norm is None else norm
        coef = clip_coefficient(norm, max_norm) if max_norm > 0 else None
        if self.fused:
            self.op(self.master, grads, self.exp_avg, self.exp_avg_sq, **kw, clip_coef=coef,
                    param_copies=None if self.shared else self._copies())
            return norm
        if coef is not None and grads:
            torch._foreach_mul_(grads, coef)
        self.op(self.master, grads, self.exp_avg, self.exp_avg_sq, **kw)
        if not self.shared:
            torch._foreach_copy_(self._copies(), self.master)
        return norm

    def _whole(self, parts: list[Tensor]) -> dict[str, Tensor]:
        """Unit tensors -> whole tensors by name (sharded: assembled by a sum over ranks, each element
        being nonzero on the one rank that owns it; TP shards then gathered over the TP group)."""
        if self.units is None:
            out = dict(zip(self.names, parts))
        else:
            out = {n: torch.zeros(local(p).shape, dtype=self.master_dtype, device=local(p).device)
                   for n, p in zip(self.names, self.params)}
            for (n, a, b), t in zip(self.units, parts):
                out[n].view(-1)[a:b] = t
            for t in out.values():
                self.ctx.all_reduce_sum_(t)
        return {n: whole(out[n], p) for n, p in zip(self.names, self.params)}

    def master_weights(self) -> dict[str, Tensor]:
        return self._whole(self.master)

    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"exp_avg.{n}": t for n, t in self._whole(self.exp_avg).items()}
        return out | {f"exp_avg_sq.{n}": t for n, t in self._whole(self.exp_avg_sq).items()}

    @torch.no_grad()
    def load(self, master: dict[str, Tensor], state: dict[str, Tensor], step_count: int) -> None:
        units = self.units or [(n, 0, local(p).numel()) for n, p in zip(self.names, self.params)]
        param = dict(zip(self.names, self.params))
        part = lambda t, n, a, b: shard_of(t, param[n]).reshape(-1)[a:b]  # noqa: E731
        for (n, a, b), m, ea, es in zip(units, self.master, self.exp_avg, self.exp_avg_sq):
            m.view(-1).copy_(part(master[n], n, a, b))
            ea.view(-1).copy_(part(state[f"exp_avg.{n}"], n, a, b))
            es.view(-1).copy_(part(state[f"exp_avg_sq.{n}"], n, a, b))
        if not self.shared or self.units is not None:  # every rank holds the whole parameters (its TP shards)
            for p, n in zip(self.params, self.names):
                local(p).copy_(shard_of(master[n], p))
        self.step_count = step_count
