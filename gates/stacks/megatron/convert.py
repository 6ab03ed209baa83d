"""Weight conversion between the case's Hugging Face MiniCPM names and megatron-core's GPTModel layout.

Pure torch: it needs neither megatron-core nor a GPU, so it is tested on its own on the CPU.

Megatron's layout (local spec, tensor parallel 1):
- `decoder.layers.i.self_attention.linear_qkv.weight` is q, k and v fused, grouped per KV group:
  for each of the g groups, its n/g query heads, then its key head, then its value head, each head
  `head_dim` rows: shape ((n + 2g) * d, h). Query head j belongs to group j // (n/g), as in HF.
- `decoder.layers.i.mlp.linear_fc1.weight` is [gate; up]: shape (2f, h); Megatron's gated linear unit
  computes act(first half) * second half.
- RMSNorm weights sit on `input_layernorm` / `pre_mlp_layernorm` / `decoder.final_layernorm`; the
  output projection is `output_layer.weight` (absent when tied to the embedding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gates.model_config import MiniCPMConfig

# Per-layer one-to-one renames (HF suffix -> Megatron suffix).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_heads: int) -> Tensor:
    """(n*d, h), (g*d, h), (g*d, h) -> ((n + 2g)*d, h), per group [its q heads..., k, v]."""
    g, per = num_kv_heads, num_heads // num_kv_heads
    d = k.shape[0] // g
    hidden = q.shape[1]
    qg = q.reshape(g, per * d, hidden)
    kg = k.reshape(g, d, hidden)
    vg = v.reshape(g, d, hidden)
    return torch.cat([qg, kg, vg], dim=1).reshape(g * (per + 2) * d, hidden)


def split_qkv(qkv: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of `fuse_qkv`."""
    g, per = num_kv_heads, num_heads // num_kv_heads
    hidden = qkv.shape[1]
    d = qkv.shape[0] // (g * (per + 2))
    grouped = qkv.reshape(g, (per + 2) * d, hidden)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return q.reshape(num_heads * d, hidden), k.reshape(g * d, hidden), v.reshape(g * d, hidden)


def fuse_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """(f, h), (f, h) -> (2f, h) as [gate; up]."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def hf_to_megatron(weights: dict[str, Tensor], cfg: MiniCPMConfig) -> dict[str, Tensor]:
    """HF MiniCPM state dict -> Megatron GPTModel parameter dict (names as `named_parameters` gives)."""
    out: dict[str, Tensor] = {}
    for hf, mg in _TOP_RENAMES.items():
        if hf in weights:
            out[mg] = weights[hf]
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf, mg in _LAYER_RENAMES.items():
            out[m + mg] = weights[p + hf]
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            weights[p + "self_attn.q_proj.weight"], weights[p + "self_attn.k_proj.weight"],
            weights[p + "self_attn.v_proj.weight"], cfg.num_heads, cfg.num_kv_heads,
        )
        out[m + "mlp.linear_fc1.weight"] = fuse_gate_up(weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"])
    expected = megatron_param_shapes(cfg)
    if set(out) != set(expected):
        raise KeyError(f"conversion produced {sorted(set(out) ^ set(expected))[:4]} unexpectedly")
    return out


def megatron_to_hf(weights: dict[str, Tensor], cfg: MiniCPMConfig) -> dict[str, Tensor]:
    """Megatron GPTModel parameter dict -> HF MiniCPM names (the inverse of `hf_to_megatron`)."""
    out: dict[str, Tensor] = {}
    for hf, mg in _TOP_RENAMES.items():
        if mg in weights:
            out[hf] = weights[mg]
    for i in range(cfg.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf, mg in _LAYER_RENAMES.items():
            out[p + hf] = weights[m + mg]
        q, k, v = split_qkv(weights[m + "self_attention.linear_qkv.weight"], cfg.num_heads, cfg.num_kv_heads)
        out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = q, k, v
        gate, up = split_gate_up(weights[m + "mlp.linear_fc1.weight"])
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
    return out


def megatron_param_shapes(cfg: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    """Every Megatron GPTModel parameter of this config (local spec, TP=1) and its shape."""
    h, d, n, g, f = cfg.hidden_size, cfg.dim_head, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        m = f"decoder.layers.{i}."
        shapes |= {
            m + "input_layernorm.weight": (h,),
            m + "self_attention.linear_qkv.weight": ((n + 2 * g) * d, h),
            m + "self_attention.linear_proj.weight": (h, n * d),
            m + "pre_mlp_layernorm.weight": (h,),
            m + "mlp.linear_fc1.weight": (2 * f, h),
            m + "mlp.linear_fc2.weight": (h, f),
        }
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["output_layer.weight"] = (cfg.vocab_size, h)
    return shapes
