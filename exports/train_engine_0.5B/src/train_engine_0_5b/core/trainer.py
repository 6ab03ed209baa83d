"""One data-parallel training step: micro batches, fp32 gradient accumulation and reduction, clipping,
the LR of the step, AdamW. Shared by `pretrain`, `bench` and the probes.

The loss of a step is sum(token CE over the global batch) / count(valid labels over the global
batch): the count is all-reduced first, every micro batch backpropagates its own sum divided by that
global count, and the reducer sums gradients over ranks. So DP=N equals DP=1 on the same global
batch up to the order of fp32 additions, never a mean of per-rank means.

One micro batch on one rank with an AdamW op that fuses clipping and the copy (optim.fuses_clip_and_copy)
skips the reducer: there is nothing to sum, and that op upcasts each bf16 gradient as it reads it, so the
math is the same without the fp32 copy (1.8 ms of the 0.5B step on an H100).

`zero1` (more than one rank): the optimizer state is sharded over the ranks (dist.py's module doc): the
reducer reduce-scatters, the optimizer updates this rank's pieces, the parameters are all-gathered.

Tensor parallelism (`dp` and `tp`, the process's DistContexts in the data- and tensor-parallel groups; the
model's parameters DTensors over tp): every TP rank of a DP group gets the same rows and computes the same
global loss, so counts, losses and gradients are summed over `dp` only; the reducer and optimizer hold local
shards, and the gradient norm reduces over `tp` (optim.py).

`skip_nonfinite` (--nan-policy skip): a step whose loss or gradient norm is not finite updates nothing
(weights, moments, step count); the check reads both on the host, so it is one sync per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .dist import DistContext, GradReducer
from .optim import AdamW, Schedule

IGNORE_INDEX = -100


class LossModel(Protocol):
    """The model part's contract with the core: an nn.Module whose `loss_sum` is the summed token CE."""

    training: bool

    def loss_sum(self, input_ids: Tensor, labels: Tensor) -> Tensor: ...  # (rows, seq) x2 -> 0-dim

    def named_parameters(self): ...

    def parameters(self): ...

    def train(self, mode: bool = True): ...


@dataclass
class StepResult:
    loss: Tensor  # 0-dim, master dtype: the global training loss
    grad_norm: Tensor  # 0-dim, before clipping
    lr: float
    valid_tokens: Tensor  # 0-dim int64: global count of labels != -100 (a tensor: reading it would sync)
    skipped: bool = False  # skip_nonfinite: the loss or grad norm was not finite, nothing was updated


class Trainer:
    def __init__(
        self, model: LossModel, optimizer: AdamW, schedule: Schedule, ctx: DistContext, *, micro_batch_size: int,
        grad_clip: float, master_dtype: torch.dtype, bucket_mb: float = 25.0, zero1: bool = False,
        skip_nonfinite: bool = False, dp: DistContext | None = None, tp: DistContext | None = None,
    ):  # fmt: skip
        self.model, self.optimizer, self.schedule, self.ctx = model, optimizer, schedule, ctx
        self.dp = dp if dp is not None else ctx  # who shares the global batch: counts and gradients sum over it
        self.tp = tp if tp is not None and tp.world > 1 else None
        optimizer.tensor_parallel(self.tp)
        self.skip_nonfinite = skip_nonfinite  # check each step on the host before its update (one sync per step)
        self.micro_batch_size, self.grad_clip, self.master_dtype = micro_batch_size, grad_clip, master_dtype
        self.params = dict(model.named_parameters())
        self.reducer = GradReducer(self.params, self.dp, master_dtype, bucket_mb, shard=zero1)
        if self.reducer.shard:
            optimizer.shard(self.reducer.pieces, self.dp)
        # after compute_grads: the step's gradients (with zero1 summed only inside this rank's pieces)
        self.grads: dict[str, Tensor] = self.reducer.grads

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.optimizer.step_count

    def compute_grads(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's rows (rows, seq) -> (global loss, global valid count, 0-dim tensors); `grads` then
        holds the gradient of the global loss, summed over ranks (model order). No host sync: the count
        stays on the device, so the CPU queues this step while the GPU still runs the last one."""
        rows, mb = input_ids.shape[0], self.micro_batch_size
        if rows % mb:
            raise ValueError(f"{rows} rows per rank do not split into micro batches of {mb}")
        direct = self.ctx.world == 1 and rows == mb and self.optimizer.fused  # (one rank: no tensor parallelism)
        # this rank's own share, before the all-reduces (the probe contract's per-rank outputs)
        self.rank_valid_tokens = (labels != IGNORE_INDEX).sum().to(self.ctx.device)
        count = self.dp.all_reduce_sum_(self.rank_valid_tokens.clone())
        loss = torch.zeros((), dtype=self.master_dtype, device=self.ctx.device)
        self.rank_loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        self.reducer.active = not direct
        self.reducer.zero()
        for i in range(0, rows, mb):
            self.reducer.sync = i + mb == rows  # reduce buckets during the last micro batch's backward
            total = self.model.loss_sum(input_ids[i : i + mb], labels[i : i + mb])
            (total / count).backward()
            loss += total.detach().to(self.master_dtype) / count
            self.rank_loss_sum += total.detach().to(torch.float64)
        if direct:  # the backward's own gradients; a parameter it did not reach gets zeros
            self.grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self.params.items()}
        else:
            self.reducer.finish()
            self.grads = self.reducer.grads
        return self.dp.all_reduce_sum_(loss), count

    def train_step(self, input_ids: Tensor, labels: Tensor, coefs: tuple[Tensor, Tensor] | None = None) -> StepResult:
        """One optimizer step on this rank's rows. `coefs`: (lr, step count) as 0-dim fp64 device tensors
        the caller has set for this step, passed to the optimizer instead of host numbers (cuda_graph.py)."""
        loss, count = self.compute_grads(input_ids, labels)
        lr = self.schedule.lr_at(self.step + 1)
        lr_arg, step_arg = (lr, None) if coefs is None else coefs
        grads = [pc.grad for pc in self.reducer.pieces] if self.reducer.shard else list(self.grads.values())
        norm = self.optimizer.grad_norm(grads)
        # every rank sees the same all-reduced loss and norm, so all of them skip together
        skipped = self.skip_nonfinite and not bool(torch.isfinite(loss) & torch.isfinite(norm))
        if not skipped:
            self.optimizer.step(grads, lr_arg, self.grad_clip, step=step_arg, norm=norm)
            if self.reducer.shard:
                self.reducer.gather_params()
        for p in self.params.values():
            p.grad = None  # direct gradients: the next backward must not add to them
        self.grads = self.reducer.grads  # nor may `grads` keep them alive through the next step
        return StepResult(loss, norm, lr, count, skipped)
