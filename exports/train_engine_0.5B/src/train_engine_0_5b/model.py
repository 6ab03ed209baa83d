"""MiniCPM4 in this engine: every op through the registry (`Ops`), parameters under HF MiniCPM names.

    h0 = embed(ids) * scale_emb
    per layer: h = h + attn(rms_norm(h)) * r;  h = h + mlp(rms_norm(h)) * r     r = scale_depth / sqrt(L)
    logits = (rms_norm(h) / (hidden / dim_model_base)) @ W_out^T                W_out tied to the embedding

RoPE is the config's (plain, linear or LongRoPE): its per-frequency factors and cos/sin scale live in the
tables every RoPE op reads (minicpm/rope.py). The embedding's padding_idx is the config's pad_token_id (that row
gets no gradient from the lookup, as in MiniCPM's nn.Embedding).

The residual add and the norm after it are one op (`add_rms_norm`), so the loop carries the residual
stream `h` and its normalized form `x` from one sublayer to the next. With residual_scale=weight, r
scales the o_proj / down_proj weights instead of their outputs (ops/residual_scale/weight.py says why,
and the sublayers take r for it). The parameters are the compute copy (the case / training dtype); fp32
master weights live in the optimizer (optim.py).

Activation recomputation (`recompute`, RECOMPUTE, chosen by parallelize.py): the named part of every layer keeps only its inputs
for backward and runs its forward again there (torch.utils.checkpoint, non-reentrant, so it composes with
torch.compile and the custom ops). "mlp": fc1 -> SwiGLU -> fc2, whose (tokens, 2 x ffn) fc1 output and
(tokens, ffn) SwiGLU output are the largest activations; "attention": QKV -> RoPE -> attention -> out
projection; "layer": the whole layer, only the residual stream and its norm kept between layers. Same
math, so the same values: it trades one more forward of that part for memory.
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train_engine_0_5b.core.config import Recompute
from train_engine_0_5b.core.recompute import maybe_recompute
from train_engine_0_5b.minicpm.config import MiniCPMConfig
from train_engine_0_5b.minicpm.rope import rope_cos_sin
from train_engine_0_5b.ops.registry import Ops


class Weight(nn.Module):
    """Holds one parameter named `weight`, so module paths give HF names (`...q_proj.weight`)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


def _out_weight(w: Tensor, r: float, ops: Ops) -> Tensor:
    """An out-projection weight as its GEMM uses it: scaled by the residual scale under residual_scale=weight."""
    return w if ops.residual_scale is None else ops.residual_scale(w, r)


class Attention(nn.Module):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        h, d, n, g = cfg.hidden_size, cfg.dim_head, cfg.num_heads, cfg.num_kv_heads
        self.n, self.g, self.d = n, g, d
        self.q_proj, self.k_proj, self.v_proj = Weight(n * d, h), Weight(g * d, h), Weight(g * d, h)
        self.o_proj = Weight(h, n * d)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ops: Ops, r: float) -> Tensor:
        B, S, _ = x.shape
        weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        if ops.qkv_rope is not None:  # the projection and RoPE as one op
            q, k, v = ops.qkv_rope(x, weights, cos, sin)
        else:
            q, k, v = ops.gemm_qkv(x, weights)
            q = q.view(B, S, self.n, self.d)  # (B, S, n, d)
            k, v = k.view(B, S, self.g, self.d), v.view(B, S, self.g, self.d)  # (B, S, g, d)
            q, k = ops.rope(q, k, cos, sin)
        o = ops.attention(q, k, v).reshape(B, S, self.n * self.d)  # (B, S, n*d)
        return ops.gemm_attn_out(o, (_out_weight(self.o_proj.weight, r, ops),))[0]  # (B, S, h)


class MLP(nn.Module):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.gate_proj, self.up_proj, self.down_proj = Weight(f, h), Weight(f, h), Weight(h, f)

    def forward(self, x: Tensor, ops: Ops, r: float) -> Tensor:
        down = _out_weight(self.down_proj.weight, r, ops)
        if ops.mlp is not None:  # one fused op for fc1 -> swiglu -> fc2
            return ops.mlp(x, self.gate_proj.weight, self.up_proj.weight, down)
        gate, up = ops.gemm_fc1(x, (self.gate_proj.weight, self.up_proj.weight))  # (B, S, f) each
        return ops.gemm_fc2(ops.swiglu(gate, up), (down,))[0]  # (B, S, h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        self.input_layernorm = Weight(cfg.hidden_size)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = Weight(cfg.hidden_size)
        self.mlp = MLP(cfg)


class Body(nn.Module):
    """Holds the `model.*` parameters (HF MiniCPM's module tree)."""

    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        self.embed_tokens = Weight(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = Weight(cfg.hidden_size)


RECOMPUTE: tuple[str, ...] = get_args(Recompute)


class MiniCPM(nn.Module):
    def __init__(self, cfg: MiniCPMConfig, ops: Ops):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.recompute: Recompute = "none"  # parallelize.apply_recompute sets it
        self.model = Body(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Weight(cfg.vocab_size, cfg.hidden_size)
        self._rope: dict[tuple, tuple[Tensor, Tensor]] = {}  # (seq, device, dtype) -> tables

    def output_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def rope_tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (seq_len, device, dtype)
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.cfg, seq_len, device, dtype)
        return self._rope[key]

    def forward(self, input_ids: Tensor, hidden_states: list[Tensor] | None = None) -> Tensor:
        """input_ids (B, S) -> logits (B, S, V). With a list, appends the residual stream after the
        embedding and after each layer (L + 1 tensors, the probe contract's hidden_states)."""
        return self._output(self.final_hidden(input_ids, hidden_states))

    def final_hidden(self, input_ids: Tensor, hidden_states: list[Tensor] | None = None) -> Tensor:
        """The normalized, 1/logit_scale-scaled last hidden state (B, S, h): the output GEMM's input."""
        cfg, ops, layers = self.cfg, self.ops, self.model.layers
        h = F.embedding(input_ids, self.model.embed_tokens.weight, cfg.pad_token_id) * cfg.scale_emb  # (B, S, h)
        cos, sin = self.rope_tables(input_ids.shape[1], h.device, h.dtype)
        if hidden_states is not None:
            hidden_states.append(h)
        x = ops.rms_norm(h, layers[0].input_layernorm.weight, cfg.rms_norm_eps)
        for i, layer in enumerate(layers):
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            x, h = maybe_recompute(self.recompute == "layer", self._layer, layer, x, h, cos, sin, next_norm.weight)
            if hidden_states is not None:
                hidden_states.append(h)
        return x / cfg.logit_scale

    def _layer(self, layer: DecoderLayer, x: Tensor, h: Tensor, cos: Tensor, sin: Tensor, next_norm: Tensor):
        """One decoder layer: (normed input, residual stream) -> (the next sublayer's normed input, stream)."""
        cfg, ops = self.cfg, self.ops
        eps, r = cfg.rms_norm_eps, cfg.residual_scale
        r_add = r if ops.residual_scale is None else 1.0  # residual_scale=weight: r is in the out-projection weights
        a = maybe_recompute(self.recompute == "attention", layer.self_attn, x, cos, sin, ops, r)
        x, h = ops.add_rms_norm(h, a, layer.post_attention_layernorm.weight, eps, r_add)
        m = maybe_recompute(self.recompute == "mlp", layer.mlp, x, ops, r)
        return ops.add_rms_norm(h, m, next_norm, eps, r_add)

    def _output(self, x: Tensor) -> Tensor:
        return self.ops.gemm_output(x, (self.output_weight(),))[0]  # (B, S, V)

    def loss_sum(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Summed token cross-entropy over labels != -100 (>= float32); the caller divides by the
        global count."""
        if self.ops.linear_cross_entropy is not None:  # the output GEMM and the loss as one op
            return self.ops.linear_cross_entropy(self.final_hidden(input_ids), self.output_weight(), labels)
        return self.ops.cross_entropy(self(input_ids), labels)


def build_model(cfg: MiniCPMConfig, ops: Ops, device: torch.device | str, dtype: torch.dtype) -> MiniCPM:
    """An uninitialized single-device model (weights come from `load_weights` or minicpm/init.py;
    recomputation and compile from parallelize.py)."""
    with torch.device("meta"):
        model = MiniCPM(cfg, ops)
    return model.to_empty(device=device).to(dtype)



@torch.no_grad()
def load_weights(model: MiniCPM, weights: dict[str, Tensor]) -> None:
    """Copy HF-named weights (any float dtype) into the model's compute copy."""
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, p in params.items():
        if tuple(weights[name].shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(weights[name].shape)}, model has {tuple(p.shape)}")
        p.copy_(weights[name])
