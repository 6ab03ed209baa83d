"""The MiniCPM4 math in eager PyTorch: the reference every engine is gated against.

It is the spec, so it stays short and obviously right: no fused kernels, no tricks.
Parameters carry Hugging Face MiniCPM names (`model.layers.0.self_attn.q_proj.weight`, ...), so a
case's `weights.safetensors` loads with `load_state_dict` as is.

RoPE is the config's (`rope_at`: plain, linear or LongRoPE; tables from float64 angles); the embedding has
the config's pad_token_id as its padding_idx (that row gets no gradient from the lookup), as MiniCPM's.

Numerics: matmuls run in the parameters' dtype; RMSNorm statistics, softmax and the loss run in at
least float32 (as HF Llama does), then cast back. Deterministic on CPU and GPU.

Attention is `eager` (the spec: explicit scores and softmax) or `sdpa` (torch's
scaled_dot_product_attention, the same math without the S x S scores in memory): the `torch-sdpa`
stack, for checks at long sequences where eager attention costs more than the gate can wait.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gates.model_config import MiniCPMConfig

IGNORE_INDEX = -100


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = _upcast(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_inv_freq(cfg: MiniCPMConfig, seq_len: int, device=None) -> tuple[Tensor, float]:
    """float64 inverse frequency of each rotary pair (d/2,) and the cos/sin factor, for positions 0..seq_len-1:
    theta^(-2i/d), divided by the config's per-pair divisors (LongRoPE, linear) when it has them."""
    d = cfg.dim_head
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    divisors, scale = cfg.rope_at(seq_len)
    if divisors is not None:
        inv_freq = inv_freq / torch.tensor(divisors, dtype=torch.float64, device=device)
    return inv_freq, scale


def rope_cos_sin(cfg: MiniCPMConfig, seq_len: int, device, dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables (seq, d) for the rotate-half RoPE layout (HF Llama / MiniCPM / Megatron), angles in float64."""
    inv_freq, scale = rope_inv_freq(cfg, seq_len, device)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)  # (S, d)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, heads, S, d)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


ATTENTION = ("eager", "sdpa")


class Attention(nn.Module):
    def __init__(self, cfg: MiniCPMConfig, impl: str = "eager"):
        super().__init__()
        if impl not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {impl!r}")
        self.impl = impl
        h, d = cfg.hidden_size, cfg.dim_head
        self.n, self.g, self.d = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(h, self.n * d, bias=False)
        self.k_proj = nn.Linear(h, self.g * d, bias=False)
        self.v_proj = nn.Linear(h, self.g * d, bias=False)
        self.o_proj = nn.Linear(self.n * d, h, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n, self.d).transpose(1, 2)  # (B, n, S, d)
        k = self.k_proj(x).view(B, S, self.g, self.d).transpose(1, 2)  # (B, g, S, d)
        v = self.v_proj(x).view(B, S, self.g, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n != self.g)
            return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n * self.d))
        k = k.repeat_interleave(self.n // self.g, dim=1)  # query head i reads kv head i // (n/g)
        v = v.repeat_interleave(self.n // self.g, dim=1)
        scores = _upcast(q @ k.transpose(-2, -1)) * self.d**-0.5  # (B, n, S, S)
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(B, S, self.n * self.d)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MiniCPMConfig, attention: str = "eager"):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.residual_scale = cfg.residual_scale

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin) * self.residual_scale
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale


class _Body(nn.Module):
    """Holds the `model.*` parameters so names match HF MiniCPM."""

    def __init__(self, cfg: MiniCPMConfig, attention: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attention) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MiniCPM(nn.Module):
    def __init__(self, cfg: MiniCPMConfig, attention: str = "eager"):
        super().__init__()
        self.cfg = cfg
        self.model = _Body(cfg, attention)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def output_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: Tensor, hidden_states: list[Tensor] | None = None) -> Tensor:
        """input_ids (B, S) -> logits (B, S, V). If `hidden_states` is a list, the residual stream after
        the embedding and after each layer is appended to it (L + 1 tensors)."""
        cfg = self.cfg
        x = self.model.embed_tokens(input_ids) * cfg.scale_emb  # (B, S, h)
        cos, sin = rope_cos_sin(cfg, input_ids.shape[1], x.device, x.dtype)
        if hidden_states is not None:
            hidden_states.append(x)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.model.norm(x) / cfg.logit_scale
        return x @ self.output_weight().t()  # (B, S, V)


def loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed token cross-entropy (in >= float32) over labels != IGNORE_INDEX, and the count of those.
    The training loss is the global sum over the global count: DP reduces both, never a mean of means."""
    total = F.cross_entropy(_upcast(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((labels != IGNORE_INDEX).sum())
