"""The config's RoPE as the cos / sin tables every RoPE op and model reads (plain, linear or LongRoPE)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.rope.reference import rope_tables
from .config import MiniCPMConfig


def rope_cos_sin(cfg: MiniCPMConfig, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos / sin tables (seq, d) of the config's RoPE for positions 0..seq_len-1, rotate-half layout."""
    divisors, scale = cfg.rope_at(seq_len)
    return rope_tables(seq_len, cfg.dim_head, cfg.rope_theta, divisors, scale, device, dtype)
