"""The GEMM sites (qkv, attn_out, fc1, fc2, output), plain: one F.linear per weight.

Signature (every gemm implementation): gemm(x (..., in), weights: tuple of (out_i, in)) ->
tuple of (..., out_i), one output per weight, in order. qkv passes (q, k, v) weights, fc1 (gate, up).
"""

import torch.nn.functional as F
from torch import Tensor


def gemm(x: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(F.linear(x, w) for w in weights)
