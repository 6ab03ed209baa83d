"""Rotary position embedding, rotate-half layout (HF Llama / MiniCPM / Megatron), plain.

rope(q (B, S, n, d), k (B, S, g, d), cos (S, d), sin (S, d)) -> (q, k) rotated; tables in q's dtype.
"""

import torch
from torch import Tensor


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (S, 1, d): broadcast over heads
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
