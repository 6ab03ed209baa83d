"""One data-parallel training step: micro batches, fp32 gradient accumulation and reduction, clipping,
the LR of the step, AdamW. Shared by `pretrain`, `bench` and the probes.

The loss of a step is sum(token CE over the global batch) / count(valid labels over the global
batch): the count is all-reduced first, every micro batch backpropagates its own sum divided by that
global count, and the reducer sums gradients over ranks. So DP=N equals DP=1 on the same global
batch up to the order of fp32 additions, never a mean of per-rank means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from train_engine_0_5b.dist import DistContext, GradReducer
from train_engine_0_5b.model import MiniCPM
from train_engine_0_5b.optim import AdamW, Schedule, clip_grads_

IGNORE_INDEX = -100


@dataclass
class StepResult:
    loss: Tensor  # 0-dim, master dtype: the global training loss
    grad_norm: Tensor  # 0-dim, before clipping
    lr: float
    valid_tokens: Tensor  # 0-dim int64: global count of labels != -100 (a tensor: reading it would sync)


class Trainer:
    def __init__(
        self, model: MiniCPM, optimizer: AdamW, schedule: Schedule, ctx: DistContext, *, micro_batch_size: int,
        grad_clip: float, master_dtype: torch.dtype, bucket_mb: float = 25.0,
    ):  # fmt: skip
        self.model, self.optimizer, self.schedule, self.ctx = model, optimizer, schedule, ctx
        self.micro_batch_size, self.grad_clip, self.master_dtype = micro_batch_size, grad_clip, master_dtype
        self.reducer = GradReducer(dict(model.named_parameters()), ctx, master_dtype, bucket_mb)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.optimizer.step_count

    def compute_grads(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's rows (rows, seq) -> (global loss, global valid count, 0-dim tensors); `reducer.grads`
        then holds the gradient of the global loss, summed over ranks. No host sync: the count stays on
        the device, so the CPU queues this step while the GPU still runs the last one."""
        rows, mb = input_ids.shape[0], self.micro_batch_size
        if rows % mb:
            raise ValueError(f"{rows} rows per rank do not split into micro batches of {mb}")
        count = self.ctx.all_reduce_sum_((labels != IGNORE_INDEX).sum().to(self.ctx.device))
        loss = torch.zeros((), dtype=self.master_dtype, device=self.ctx.device)
        self.reducer.zero()
        for i in range(0, rows, mb):
            self.reducer.sync = i + mb == rows  # reduce buckets during the last micro batch's backward
            total = self.model.loss_sum(input_ids[i : i + mb], labels[i : i + mb])
            (total / count).backward()
            loss += total.detach().to(self.master_dtype) / count
        self.reducer.finish()
        return self.ctx.all_reduce_sum_(loss), count

    def train_step(self, input_ids: Tensor, labels: Tensor) -> StepResult:
        loss, count = self.compute_grads(input_ids, labels)
        grads = list(self.reducer.grads.values())
        norm = clip_grads_(grads, self.grad_clip)
        lr = self.schedule.lr_at(self.step + 1)
        self.optimizer.step(grads, lr)
        return StepResult(loss, norm, lr, count)
