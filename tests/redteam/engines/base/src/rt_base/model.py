"""MiniCPM4 math, engine-style: parameters by HF MiniCPM name, SDPA attention, one QKV GEMM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rt_base.flaws import Flaws

IGNORE = -100


def param_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, n, g, f, V = cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"], cfg["ffn_hidden_size"], cfg["vocab_size"]
    d = head_dim(cfg)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, h)}
    for i in range(cfg["num_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (n * d, h),
                p + "self_attn.k_proj.weight": (g * d, h), p + "self_attn.v_proj.weight": (g * d, h),
                p + "self_attn.o_proj.weight": (h, n * d), p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}
    out["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, h)
    return out


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_heads"]


class Model(nn.Module):
    """Parameters live in `self.p` (name -> Parameter), registered under dot-free names."""

    def __init__(self, cfg: dict, flaws: Flaws, dtype: torch.dtype, device: str):
        super().__init__()
        self.cfg, self.flaws = cfg, flaws
        self.p: dict[str, nn.Parameter] = {}
        for name, shape in param_shapes(cfg).items():
            param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            self.register_parameter(name.replace(".", "__"), param)
            self.p[name] = param

    def load(self, weights: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in weights.items():
                self.p[k].copy_(v)

    def _norm(self, x: Tensor, w: Tensor) -> Tensor:
        return w * F.rms_norm(x.float() if x.dtype != torch.float64 else x, (x.shape[-1],), eps=self.cfg["rms_norm_eps"]).to(x.dtype)

    def _rope(self, S: int, device, dtype) -> tuple[Tensor, Tensor]:
        d = head_dim(self.cfg)
        theta = self.flaws.rope_theta or self.cfg["rope_theta"]
        inv = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float64) / d)
        pos = torch.arange(S, device=device, dtype=torch.float64)
        if self.flaws.rope_wrap:
            pos = pos % self.flaws.rope_wrap
        scale = 1.0
        rs = None if self.flaws.ignores_rope_scaling else self.cfg.get("rope_scaling")
        if rs is not None and rs["type"] == "longrope":  # per-pair divisors; cos/sin scaled past the original length
            orig, longest = rs["original_max_position_embeddings"], self.cfg["max_seq_length"]
            inv = inv / torch.tensor(rs["long_factor"] if S > orig else rs["short_factor"], dtype=torch.float64, device=device)
            scale = math.sqrt(1 + math.log(longest / orig) / math.log(orig)) if longest > orig else 1.0
        elif rs is not None:  # linear: positions divided by the factor
            inv = inv / rs["factor"]
        ang = pos[:, None] * inv  # (S, d/2)
        ang = torch.cat([ang, ang], -1)
        return (ang.cos() * scale).to(dtype), (ang.sin() * scale).to(dtype)

    def _attn(self, i: int, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cfg, p = self.cfg, f"model.layers.{i}.self_attn."
        B, S, _ = x.shape
        n, g, d = cfg["num_heads"], cfg["num_kv_heads"], head_dim(cfg)
        w = torch.cat([self.p[p + "q_proj.weight"], self.p[p + "k_proj.weight"], self.p[p + "v_proj.weight"]])
        q, k, v = (x @ w.t()).split([n * d, g * d, g * d], dim=-1)  # one GEMM
        q = q.view(B, S, n, d).transpose(1, 2)  # (B, n, S, d)
        k = k.view(B, S, g, d).transpose(1, 2)
        v = v.view(B, S, g, d).transpose(1, 2)
        rot = lambda t: t * cos + torch.cat([-t[..., d // 2:], t[..., : d // 2]], -1) * sin  # noqa: E731
        o = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=not self.flaws.non_causal, enable_gqa=True)
        return o.transpose(1, 2).reshape(B, S, n * d) @ self.p[p + "o_proj.weight"].t()

    def _mlp(self, i: int, x: Tensor) -> Tensor:
        p = f"model.layers.{i}.mlp."
        return (F.silu(x @ self.p[p + "gate_proj.weight"].t()) * (x @ self.p[p + "up_proj.weight"].t())) @ self.p[p + "down_proj.weight"].t()

    def residual_scale(self, i: int) -> float:
        L = self.cfg["num_layers"]
        if self.flaws.residual_scale_layer == i:
            return self.cfg["scale_depth"] / L
        return self.cfg["scale_depth"] / math.sqrt(L)

    def forward(self, ids: Tensor, hidden: list[Tensor] | None = None) -> Tensor:
        cfg = self.cfg
        # padding_idx: the pad row gets no gradient from the lookup (MiniCPM's nn.Embedding)
        x = F.embedding(ids, self.p["model.embed_tokens.weight"], padding_idx=None if self.flaws.ignores_padding_idx else cfg.get("pad_token_id")) * cfg["scale_emb"]
        cos, sin = self._rope(ids.shape[1], x.device, x.dtype)
        if hidden is not None:
            hidden.append(x)
        for i in range(cfg["num_layers"]):
            pre = f"model.layers.{i}."
            s = self.residual_scale(i)
            x = x + self._attn(i, self._norm(x, self.p[pre + "input_layernorm.weight"]), cos, sin) * s
            x = x + self._mlp(i, self._norm(x, self.p[pre + "post_attention_layernorm.weight"])) * s
            if self.flaws.nan_layer == i:
                x = x * float("nan")
            if hidden is not None:
                hidden.append(x)
        x = self._norm(x, self.p["model.norm.weight"]) / (cfg["hidden_size"] / cfg["dim_model_base"])
        head = self.p["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else self.p["lm_head.weight"]
        return x @ head.t()  # (B, S, V)


def loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    up = logits.float() if logits.dtype != torch.float64 else logits
    return F.cross_entropy(up.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
