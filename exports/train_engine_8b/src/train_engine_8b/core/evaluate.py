"""Validation: the mean token cross-entropy of held-out batches (no gradients, no optimizer), all ranks together.

The loss is sum(token CE over every rank's rows of every batch) / count(valid labels), the same global
normalization as a training step's loss (trainer.py), so eval and training losses compare; perplexity is
exp(loss).
"""

from __future__ import annotations

import math

import torch

from .dist import DistContext
from .trainer import IGNORE_INDEX, LossModel


@torch.no_grad()
def evaluate(model: LossModel, ctx: DistContext, loader, iters: int, micro_batch_size: int) -> dict[str, float]:
    """{"eval_loss", "eval_ppl", "eval_tokens"} over batches 0 .. iters-1 of `loader` (`batch(i)` -> ids, labels)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = torch.zeros((), dtype=torch.int64, device=ctx.device)
    try:
        for i in range(iters):
            ids, labels = (x.to(ctx.device, non_blocking=True) for x in loader.batch(i))
            for j in range(0, ids.shape[0], micro_batch_size):
                total += model.loss_sum(ids[j : j + micro_batch_size], labels[j : j + micro_batch_size]).double()
            count += (labels != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    loss = float(ctx.all_reduce_sum_(total)) / max(1, int(ctx.all_reduce_sum_(count)))
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(count)}
