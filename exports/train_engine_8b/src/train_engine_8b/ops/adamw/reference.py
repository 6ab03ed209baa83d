"""AdamW as torch.optim.AdamW computes it, one tensor at a time (the reference), in place.

adamw(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decays):
`step` is the 1-based optimizer step, `weight_decays[i]` the decay of params[i] (0 for norm weights).
Per tensor: p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
p -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps).
"""

import torch
from torch import Tensor


@torch.no_grad()
def adamw(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
    step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decays: list[float],
) -> None:  # fmt: skip
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    for p, g, m, v, wd in zip(params, grads, exp_avgs, exp_avg_sqs, weight_decays, strict=True):
        if wd:
            p.mul_(1 - lr * wd)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v / bc2).sqrt_().add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)
