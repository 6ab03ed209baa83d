"""Between the model (plain or tensor-parallel) and Hugging Face layouts.

- `to_hf(model)`: every parameter as one unsharded tensor under its HF MiniCPM name (a TP model's DTensors
  gathered); the native layout OpenBMB publishes.
- `load_hf(model, state)`: the inverse: full HF-named tensors into a plain or TP model, each rank keeping
  its own shard (no communication: every rank holds the full tensors).
- `fold_to_llama(cfg, state)` / `llama_config_dict(cfg)`: MiniCPM's three scalar scales folded into the
  weights, RoPE as transformers' `longrope`, so `transformers.LlamaForCausalLM` computes the same logits
  without remote code (the 0.5B engine's hf_fold, same rules).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from train_engine_8b.model_config import MiniCPMConfig, hf_param_shapes


def to_hf(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """{HF name: full tensor} on every rank. Under TP this is a collective (all ranks call it, same order)."""
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = full.detach().to(dtype or full.dtype).clone()
    return out


@torch.no_grad()
def load_hf(model: nn.Module, cfg: MiniCPMConfig, state: dict[str, Tensor]) -> None:
    """Copy full HF-named weights (any float dtype) into the model's parameters (plain or DTensor shards)."""
    want = hf_param_shapes(cfg)
    if set(want) != set(state):
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, p in model.named_parameters():
        w = state[name]
        if tuple(w.shape) != want[name]:
            raise ValueError(f"{name}: shape {tuple(w.shape)}, model has {want[name]}")
        w = w.to(device=p.device, dtype=p.dtype)
        if isinstance(p, DTensor):  # src_data_rank=None: take this rank's shard of its own full copy
            p.to_local().copy_(distribute_tensor(w, p.device_mesh, p.placements, src_data_rank=None).to_local())
        else:
            p.copy_(w)


def fold_to_llama(cfg: MiniCPMConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF MiniCPM-named weights -> LlamaForCausalLM weights: scale_emb into the embedding, scale_depth /
    sqrt(L) into o_proj and down_proj, 1 / (hidden / dim_model_base) into an (always untied) lm_head."""
    out: dict[str, Tensor] = {}
    head = state["model.embed_tokens.weight"] if cfg.tie_word_embeddings else state["lm_head.weight"]
    for name, w in state.items():
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            w = w * cfg.scale_emb
        elif name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w = w * cfg.residual_scale
        out[name] = w.clone()
    out["lm_head.weight"] = head / cfg.logit_scale
    return out


def llama_config_dict(cfg: MiniCPMConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` (also a config.json body) with the fold's math."""
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.dim_head,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_length, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "pad_token_id": cfg.pad_token_id,
    }
    rope = cfg.rope_scaling
    if rope is not None:  # factor and attention_factor pinned to what MiniCPM's code derives
        orig = rope.original_max_position_embeddings
        out["rope_scaling"] = {"rope_type": "longrope", "short_factor": list(rope.short_factor),
                               "long_factor": list(rope.long_factor), "original_max_position_embeddings": orig,
                               "factor": cfg.max_seq_length / orig, "attention_factor": rope.cos_sin_scale(cfg.max_seq_length)}
        out["original_max_position_embeddings"] = orig  # transformers 4.x reads longrope's from the top level
    return out
