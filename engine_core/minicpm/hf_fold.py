"""Fold MiniCPM's scales into a plain Llama checkpoint that `transformers` loads without remote code.

MiniCPM differs from Llama only by three scalar scales, each of which commutes with a linear map:
- `scale_emb` multiplies the embedding output        -> folded into `embed_tokens`;
- `scale_depth / sqrt(L)` multiplies each attention and MLP output before the residual add
                                                      -> folded into `o_proj` and `down_proj`;
- the final hidden state is divided by `hidden / dim_model_base`
                                                      -> folded into an untied `lm_head`.
With a tied embedding, the folded input embedding and output head differ, so the Llama checkpoint
is always untied. RoPE maps to transformers' own rope types (`longrope`, `linear`) and pad_token_id to
Llama's padding_idx, so `LlamaForCausalLM` computes the same function and trains the same rows.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import MiniCPMConfig


def fold_to_llama(cfg: MiniCPMConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF MiniCPM-named weights (as in a case's weights.safetensors) -> LlamaForCausalLM weights."""
    out: dict[str, torch.Tensor] = {}
    head = state["model.embed_tokens.weight"] if cfg.tie_word_embeddings else state["lm_head.weight"]
    for name, w in state.items():
        if name == "model.embed_tokens.weight":
            w = w * cfg.scale_emb
        elif name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w = w * cfg.residual_scale
        elif name == "lm_head.weight":
            continue
        out[name] = w.clone()
    out["lm_head.weight"] = head / cfg.logit_scale
    return out


def llama_rope_scaling(cfg: MiniCPMConfig) -> dict[str, Any] | None:
    """The config's RoPE as transformers' rope_scaling; longrope's factor and attention_factor are pinned to
    the values MiniCPM's code derives (transformers would otherwise derive them from its own fields)."""
    rope = cfg.rope_scaling
    if rope is None:
        return None
    if rope.type == "linear":
        return {"rope_type": "linear", "factor": rope.factor}
    orig = rope.original_max_position_embeddings
    return {"rope_type": "longrope", "short_factor": list(rope.short_factor), "long_factor": list(rope.long_factor),
            "original_max_position_embeddings": orig, "factor": cfg.max_seq_length / orig,
            "attention_factor": rope.cos_sin_scale(cfg.max_seq_length)}


def llama_config_dict(cfg: MiniCPMConfig, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` (also a valid config.json body)."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_head,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_length,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    rope = llama_rope_scaling(cfg)
    if rope is not None:
        out["rope_scaling"] = rope
        if "original_max_position_embeddings" in rope:  # transformers 4.x reads longrope's from the top level
            out["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    return out
