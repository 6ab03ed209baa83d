"""Causal GQA attention, plain math (the reference): scores and softmax in >= float32, then back.

Layout (every attention implementation): q (B, S, n, d), k and v (B, S, g, d) with g dividing n;
returns (B, S, n, d). Query head i reads kv head i // (n / g).
"""

import torch
from torch import Tensor

from .._numerics import upcast


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    B, S, n, d = q.shape
    g = k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, d)
    k = k.repeat_interleave(n // g, dim=1)  # (B, n, S, d)
    v = v.repeat_interleave(n // g, dim=1)
    scores = upcast(q @ k.transpose(-2, -1)) * d**-0.5  # (B, n, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).to(v.dtype)
    return (probs @ v).transpose(1, 2)  # (B, S, n, d)
