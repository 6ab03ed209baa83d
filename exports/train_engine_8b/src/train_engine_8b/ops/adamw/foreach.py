"""AdamW with torch's multi-tensor (_foreach) kernels: the same math as reference.py in a handful of
launches per step instead of ~6 per tensor; the GPU default."""

import torch
from torch import Tensor


@torch.no_grad()
def adamw(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
    step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decays: list[float],
) -> None:  # fmt: skip
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    decayed = [p for p, wd in zip(params, weight_decays, strict=True) if wd]
    if decayed:
        torch._foreach_mul_(decayed, [1 - lr * wd for wd in weight_decays if wd])
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_div(exp_avg_sqs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / bc1)
