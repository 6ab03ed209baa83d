"""MiniCPM4-8B in plain PyTorch, parameters under HF MiniCPM names: the math of the 0.5B engine's model.

    h0 = embed(ids) * scale_emb                                            embed: padding_idx = pad_token_id
    per layer: h = h + attn(rms_norm(h)) * r;  h = h + mlp(rms_norm(h)) * r     r = scale_depth / sqrt(L)
    logits = (rms_norm(h) / (hidden / dim_model_base)) @ W_out^T                W_out: lm_head (untied in 8B)

Built from nn.Linear / nn.Embedding so that torch's tensor-parallel styles apply to them unchanged
(parallelize.py). Every reshape infers the head count (`-1`): under TP a rank holds n / tp query and g / tp KV
heads and the same code runs on its shard. RoPE is the config's (plain, linear or LongRoPE): the shared tables
(minicpm/rope.py) built once per (seq, device, dtype) from the full sequence length, which the token ids keep
under sequence parallelism, applied by the core's reference rope. Fresh weights: minicpm/init.py.
"""

from __future__ import annotations

from typing import Callable, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from train_engine_8b.core.config import Recompute
from train_engine_8b.core.recompute import maybe_recompute
from train_engine_8b.core.trainer import IGNORE_INDEX
from train_engine_8b.minicpm.config import MiniCPMConfig
from train_engine_8b.minicpm.rope import rope_cos_sin
from train_engine_8b.ops.attention.reference import attention as reference_attention
from train_engine_8b.ops.rope.reference import rope
from train_engine_8b.vocab_parallel_ce import vocab_parallel_cross_entropy_sum

RECOMPUTE: tuple[str, ...] = get_args(Recompute)


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64): norm statistics and the loss."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    """weight * x / rms(x): statistics in >= float32, the weight applied in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        xf = _upcast(x)
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    """Causal GQA: query head i reads KV head i // (n / g). The attention itself is the op registry's
    (`attention_op`, (B, S, n, d) x (B, S, g, d) x2 -> (B, S, n, d): the reference on a CPU, FA4 or SDPA on
    CUDA; build.py sets the resolved one); under TP it sees the rank's local heads."""

    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        h, d, n, g = cfg.hidden_size, cfg.dim_head, cfg.num_heads, cfg.num_kv_heads
        self.d = d
        self.attention_op: Callable[[Tensor, Tensor, Tensor], Tensor] = reference_attention
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(h, n * d, bias=False), nn.Linear(h, g * d, bias=False),
                                                 nn.Linear(h, g * d, bias=False))
        self.o_proj = nn.Linear(n * d, h, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, -1, self.d)  # (B, S, n, d)
        k = self.k_proj(x).view(B, S, -1, self.d)  # (B, S, g, d)
        q, k = rope(q, k, cos, sin)
        v = self.v_proj(x).view(B, S, -1, self.d)  # (B, S, g, d)
        o = self.attention_op(q, k, v)  # (B, S, n, d)
        return self.o_proj(o.reshape(B, S, -1))  # (B, S, h)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        # build.py at TP=1, when asked (--ops mlp=...): the registry's MLP as one op; None: the three modules
        self.mlp_op: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.mlp_op is not None:
            return self.mlp_op(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, S, h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.r = cfg.residual_scale
        self.recompute: Recompute = "none"  # parallelize.apply_recompute sets it

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return maybe_recompute(self.recompute == "layer", self._forward, h, cos, sin)

    def _forward(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        a = maybe_recompute(self.recompute == "attention", self.self_attn, self.input_layernorm(h), cos, sin)
        h = h + a * self.r
        m = maybe_recompute(self.recompute == "mlp", self.mlp, self.post_attention_layernorm(h))
        return h + m * self.r


class Body(nn.Module):
    """Holds the `model.*` parameters (HF MiniCPM's module tree)."""

    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MiniCPM(nn.Module):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope: dict[tuple, tuple[Tensor, Tensor]] = {}  # (seq, device, dtype) -> tables
        self.op_record: dict = {}  # build.py: which implementation each op runs (logs, checkpoints)
        # build.py, without TP: the registry's output GEMM + loss as one op (never holding the logits); None: logits
        # then cross-entropy (and always under TP: vocab_parallel_ce.py)
        self.linear_cross_entropy: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def rope_tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (seq_len, device, dtype)
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.cfg, seq_len, device, dtype)
        return self._rope[key]

    def final_hidden(self, input_ids: Tensor, hidden_states: list[Tensor] | None = None) -> Tensor:
        """The normalized, 1/logit_scale-scaled last hidden state (B, S, h): the output GEMM's input. With a list,
        appends the residual stream after the embedding and after each layer (the probe contract's hidden_states;
        under TP DTensors sharded on the sequence)."""
        cfg = self.cfg
        cos, sin = self.rope_tables(input_ids.shape[1], input_ids.device, self.model.norm.weight.dtype)
        h = self.model.embed_tokens(input_ids) * cfg.scale_emb  # (B, S, h)
        if hidden_states is not None:
            hidden_states.append(h)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
            if hidden_states is not None:
                hidden_states.append(h)
        return self.model.norm(h) / cfg.logit_scale  # (B, S, h)

    def output_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: Tensor, hidden_states: list[Tensor] | None = None) -> Tensor:
        """input_ids (B, S) -> logits (B, S, V); under TP a DTensor sharded on V (parallelize.py). `hidden_states`:
        final_hidden's."""
        x = self.final_hidden(input_ids, hidden_states)
        if self.lm_head is None:
            return F.linear(x, self.model.embed_tokens.weight)
        return self.lm_head(x)  # (B, S, V)

    def loss_sum(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Summed token cross-entropy over labels != -100 (>= float32), a plain tensor; the caller divides by the
        global count. Under TP the logits stay sharded on V (vocab_parallel_ce.py)."""
        if self.linear_cross_entropy is not None:  # the output GEMM and the loss as one op
            return self.linear_cross_entropy(self.final_hidden(input_ids), self.output_weight(), labels)
        logits = self(input_ids)
        if isinstance(logits, DTensor):
            mesh = logits.device_mesh
            part = _upcast(logits.to_local()).flatten(0, 1)  # (B * S, V / tp)
            start = mesh.get_local_rank() * part.shape[-1]
            return vocab_parallel_cross_entropy_sum(part, labels.flatten(), start, mesh.get_group(), IGNORE_INDEX)
        return F.cross_entropy(_upcast(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")


def build_model(cfg: MiniCPMConfig, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> MiniCPM:
    """An uninitialized model (on `meta` by default: parallelize first, then `to_empty` and load weights)."""
    with torch.device("meta"):
        model = MiniCPM(cfg)
    return model if str(device) == "meta" else model.to_empty(device=device).to(dtype)

