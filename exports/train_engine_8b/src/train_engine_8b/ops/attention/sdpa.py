"""Causal GQA attention through torch's scaled_dot_product_attention (flash / cuDNN / efficient
kernels on GPU, chosen by torch); the GPU default. Same layout as reference.py."""

import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )  # (B, n, S, d)
    return out.transpose(1, 2)  # (B, S, n, d)
