"""Summed token cross-entropy on vocab-sharded logits (Megatron's vocab-parallel cross-entropy).

Each TP rank holds logits for its slice of the vocabulary, (N, V / tp). Three all-reduces over the TP group
give every rank the row max, the sum of exponentials and the target's logit, so the whole logits are never
gathered; backward is local: softmax - one-hot on the rank's slice. Every rank returns the same summed loss
as a plain tensor, so the trainer and the evaluation need no DTensor or loss_parallel context around it.
`torch.distributed.tensor.parallel.loss_parallel` computes the same; the TP tests compare the TP model's loss and
gradients through it with the plain model's F.cross_entropy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, vocab_start: int, ignore_index: int, group) -> Tensor:
        part = logits.shape[-1]
        row_max = logits.detach().max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max[:, None]
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        valid = labels != ignore_index
        local = labels - vocab_start
        inside = valid & (local >= 0) & (local < part)  # the target is in this rank's slice
        index = torch.where(inside, local, 0)
        target = torch.where(inside, shifted.gather(1, index[:, None]).squeeze(1), 0.0)
        dist.all_reduce(target, group=group)
        per_token = torch.where(valid, sum_exp.log() - target, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), index, inside, valid)
        return per_token.sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        softmax, index, inside, valid = ctx.saved_tensors
        g = softmax
        g[torch.arange(g.shape[0], device=g.device), index] -= inside.to(g.dtype)
        g.mul_((valid.to(g.dtype) * grad)[:, None])
        return g, None, None, None, None


def vocab_parallel_cross_entropy_sum(logits: Tensor, labels: Tensor, vocab_start: int, group,
                                     ignore_index: int = -100) -> Tensor:
    """sum over labels != ignore_index of CE; `logits` (N, V / tp) this rank's vocabulary slice starting at
    `vocab_start`, in >= float32; `labels` (N,) global token ids."""
    return _VocabParallelCE.apply(logits, labels, vocab_start, ignore_index, group)
