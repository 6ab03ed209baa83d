"""Fresh weights for a MiniCPM model: the one init rule every engine starts from."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import MiniCPMConfig, hf_param_shapes


@torch.no_grad()
def init_weights(cfg: MiniCPMConfig, init_std: float, seed: int) -> dict[str, Tensor]:
    """Fresh fp32 weights by HF name, in hf_param_shapes' order (the draw order, so the same on every rank
    and engine for a seed): norms 1; the embedding and lm_head N(0, init_std) with the padding row
    (pad_token_id) zero; hidden matrices N(0, init_std / sqrt(hidden / dim_model_base)) (muP's width scaling)."""
    gen = torch.Generator().manual_seed(seed)
    hidden_std = init_std / math.sqrt(cfg.hidden_size / cfg.dim_model_base)
    out: dict[str, Tensor] = {}
    for name, shape in hf_param_shapes(cfg).items():
        if len(shape) == 1:
            out[name] = torch.ones(shape)
        else:
            std = init_std if name in ("model.embed_tokens.weight", "lm_head.weight") else hidden_std
            out[name] = torch.randn(shape, generator=gen) * std
    if cfg.pad_token_id is not None:  # as nn.Embedding(padding_idx) and MiniCPM's init leave it
        out["model.embed_tokens.weight"][cfg.pad_token_id] = 0.0
    return out
