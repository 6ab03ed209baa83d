"""A core-attention module for megatron-core's module spec that calls PyTorch's fused SDPA.

Megatron's local spec ships `DotProductAttention`, which materializes the (s x s) scores; without
Transformer Engine it is the only core attention the local spec has. This module is the `megatron-sdpa`
variant's stand-in for TE's fused attention: same inputs and output layout, causal, GQA through
`enable_gqa` (no repeated K/V in memory), softmax scale 1/sqrt(head_dim). No dropout (the reference
trains without it), no packed sequences, no attention bias: each is refused with a message.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SdpaCoreAttention(MegatronModule):
    """Drop-in for `DotProductAttention`: q (sq, b, np, hn), k/v (sk, b, ng, hn) -> (sq, b, np*hn)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None, **_: Any):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SdpaCoreAttention supports the causal mask only, got {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("SdpaCoreAttention does not implement attention dropout; set attention_dropout=0")
        if config.tensor_model_parallel_size != 1 or config.context_parallel_size != 1:
            raise ValueError("SdpaCoreAttention is written for tensor and context parallel size 1")
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params: Any = None) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SdpaCoreAttention: packed sequences and attention bias are not supported")
        sq, b, heads, hn = query.shape
        q = query.permute(1, 2, 0, 3)  # (b, np, sq, hn)
        k = key.permute(1, 2, 0, 3)  # (b, ng, sk, hn)
        v = value.permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=heads != k.shape[1])  # (b, np, sq, hn)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)  # (sq, b, np*hn)
