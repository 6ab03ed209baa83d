"""RMSNorm and its residual variant, plain: statistics in >= float32, the weight applied in the input dtype.

- rms_norm(x, weight, eps) -> weight * x / rms(x)
- add_rms_norm(x, y, weight, eps, residual_scale) -> (rms_norm(h), h) with h = x + y * residual_scale:
  MiniCPM's scaled residual add (scale_depth / sqrt(L)) fused with the norm that follows it.
"""

import torch
from torch import Tensor

from .._numerics import upcast


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = upcast(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm(x: Tensor, y: Tensor, weight: Tensor, eps: float, residual_scale: float) -> tuple[Tensor, Tensor]:
    # r = 1 (residual_scale=weight folds r into the out-projection weights): no multiply, so no pass over
    # dh in backward either (same values: y * 1.0 == y)
    h = x + y if residual_scale == 1.0 else x + y * residual_scale
    return rms_norm(h, weight, eps), h
