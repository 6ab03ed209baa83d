"""Rotary position embedding, rotate-half layout (HF Llama / MiniCPM / Megatron), plain.

rope(q (B, S, n, d), k (B, S, g, d), cos (S, d), sin (S, d)) -> (q, k) rotated; tables in q's dtype.
rope_tables builds the tables every RoPE implementation reads: per rotary pair i the angle of position p is
p * theta^(-2i/d) / divisors[i] (LongRoPE's and linear scaling's per-frequency factors), cos and sin times
`scale`; halves equal.
"""

from collections.abc import Sequence

import torch
from torch import Tensor


def rope_tables(
    seq_len: int, head_dim: int, theta: float = 10000.0, divisors: Sequence[float] | None = None, scale: float = 1.0,
    device=None, dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """cos, sin (seq_len, head_dim): angles in float64, then cast (the workspace reference's math)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if divisors is not None:
        inv_freq = inv_freq / torch.tensor(divisors, dtype=torch.float64, device=device)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)  # (S, d)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (S, 1, d): broadcast over heads
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
