"""MiniCPM4 model configuration for the 8B engine: the typed description of the model, its presets.

Same fields, derived values and meaning as the 0.5B engine's MiniCPMConfig (so configs, checkpoints and the
HF layout are interchangeable), trimmed to what the 8B uses: plain RoPE or LongRoPE (no linear scaling).

Presets (`PRESETS`) are values; variants derive with `preset.model_copy(update=...)`:
- `minicpm4-8b`: the published config.json (data/released/minicpm4-8b.json), read by `from_hf_config`;
- `minicpm4-8b-reduced`: the same math and per-head shapes (head dim 128, 32 heads on 2 KV heads, untied,
  LongRoPE, pad 2) at toy width, depth and vocab: TP tests run it on a CPU in seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A model config that cannot be used; the message names the offending field."""


class LongRope(BaseModel):
    """LongRoPE (MiniCPM4's and HF's `longrope`): the inverse frequency of rotary pair i is divided by
    short_factor[i] for sequences up to original_max_position_embeddings and by long_factor[i] beyond; cos
    and sin are scaled by sqrt(1 + ln(m / o) / ln(o)) when max_seq_length m exceeds o, else by 1."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["longrope"] = "longrope"
    short_factor: tuple[float, ...] = Field(strict=False)
    long_factor: tuple[float, ...] = Field(strict=False)
    original_max_position_embeddings: int = Field(gt=0)

    def cos_sin_scale(self, max_seq_length: int) -> float:
        ratio = max_seq_length / self.original_max_position_embeddings
        return 1.0 if ratio <= 1.0 else math.sqrt(1.0 + math.log(ratio) / math.log(self.original_max_position_embeddings))


class MiniCPMConfig(BaseModel):
    """Llama-shaped decoder with MiniCPM's muP-style scales (docs/DESIGN.md, "The models")."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field("custom", description="preset or user name, for reports only")
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int | None = Field(None, gt=0, description="defaults to hidden_size // num_heads")
    ffn_hidden_size: int = Field(gt=0, description="SwiGLU inner size")
    vocab_size: int = Field(gt=0)
    max_seq_length: int = Field(4096, gt=0, description="longest sequence the model is trained on")
    rms_norm_eps: float = Field(1e-6, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    scale_emb: float = Field(12.0, gt=0)
    scale_depth: float = Field(1.4, gt=0)
    dim_model_base: int = Field(256, gt=0)
    tie_word_embeddings: bool = True
    rope_scaling: LongRope | None = Field(None, description="None: plain RoPE")
    pad_token_id: int | None = Field(
        None, ge=0, description="the embedding's padding_idx, as MiniCPM's: that row gets no gradient from the lookup")

    @model_validator(mode="after")
    def _check_shapes(self) -> "MiniCPMConfig":
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size}) unless head_dim is given")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.dim_head % 2:
            raise ValueError(f"head_dim ({self.dim_head}) must be even for RoPE")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be below vocab_size ({self.vocab_size})")
        rope = self.rope_scaling
        if rope is not None:
            for name in ("short_factor", "long_factor"):
                factors = getattr(rope, name)
                if len(factors) != self.dim_head // 2 or not all(f > 0 and math.isfinite(f) for f in factors):
                    raise ValueError(f"rope_scaling.{name} needs head_dim / 2 = {self.dim_head // 2} positive "
                                     f"factors, got {len(factors)}")
            if self.max_seq_length < rope.original_max_position_embeddings:
                # MiniCPM's code then scales cos/sin below 1 and transformers' by 1: no single meaning to implement
                raise ValueError(f"max_seq_length ({self.max_seq_length}) must be at least "
                                 f"rope_scaling.original_max_position_embeddings ({rope.original_max_position_embeddings})")
        return self

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def residual_scale(self) -> float:
        """scale_depth / sqrt(L): multiplies each attention and MLP output before the residual add."""
        return self.scale_depth / math.sqrt(self.num_layers)

    @property
    def logit_scale(self) -> float:
        """The final hidden state is divided by hidden / dim_model_base before the output projection."""
        return self.hidden_size / self.dim_model_base

    def rope_at(self, seq_len: int) -> tuple[tuple[float, ...] | None, float]:
        """RoPE for positions 0..seq_len-1: the divisor of each rotary pair's inverse frequency (None: plain
        RoPE) and the factor on cos and sin."""
        rope = self.rope_scaling
        if rope is None:
            return None, 1.0
        long = seq_len > rope.original_max_position_embeddings
        return (rope.long_factor if long else rope.short_factor), rope.cos_sin_scale(self.max_seq_length)

    def num_params(self) -> int:
        """Trainable parameters (embedding counted once when tied)."""
        h, d = self.hidden_size, self.dim_head
        per_layer = h * d * (self.num_heads * 2 + self.num_kv_heads * 2) + 3 * h * self.ffn_hidden_size + 2 * h
        out = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + out

    def flops_per_token(self, seq_length: int) -> float:
        """Megatron-LM v0.15 training FLOPs per token (causal attention halved), DESIGN.md's formula."""
        h, L, s = self.hidden_size, self.num_layers, seq_length
        n, g, d, f, V = self.num_heads, self.num_kv_heads, self.dim_head, self.ffn_hidden_size, self.vocab_size
        return 6.0 * (L * (2 * h * n * d + 2 * h * g * d + 3 * h * f + s * n * d) + h * V)


# HF MiniCPM config.json key -> our field: the keys that shape the math.
_HF_KEYS = {
    "hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim", "intermediate_size": "ffn_hidden_size",
    "vocab_size": "vocab_size", "max_position_embeddings": "max_seq_length", "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta", "scale_emb": "scale_emb", "scale_depth": "scale_depth",
    "dim_model_base": "dim_model_base", "tie_word_embeddings": "tie_word_embeddings", "pad_token_id": "pad_token_id",
}
# Keys whose other values change the math in ways not implemented here: the values accepted.
_HF_FIXED: dict[str, tuple[Any, ...]] = {
    "model_type": ("minicpm",), "hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,),
    "attention_dropout": (0, 0.0), "use_mup": (True,), "sparse_config": (None,), "no_rope": (False,),
}
# Keys that do not change the training math (inference, initialization, tokens, provenance): ignored.
_HF_METADATA = frozenset({
    "_name_or_path", "architectures", "auto_map", "bos_token_id", "eos_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "pretraining_tp", "mup_denominator",
})


def _rope_from_hf(rope: Any, max_len: Any) -> dict[str, Any]:
    """A config.json rope_scaling object -> our rope_scaling values; raises ConfigError for what is not LongRoPE."""
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "longrope":
        raise ConfigError(f"rope_scaling {rope!r}: only longrope (or none) is implemented in this engine")
    keys = ("short_factor", "long_factor", "original_max_position_embeddings")
    extra = sorted(set(rope) - set(keys) - {"rope_type", "type", "factor"})
    if extra:
        raise ConfigError(f"rope_scaling: {', '.join(extra)} not implemented")
    orig = rope.get("original_max_position_embeddings")
    if "factor" in rope and isinstance(orig, int) and isinstance(max_len, int) and rope["factor"] != max_len / orig:
        raise ConfigError(f"rope_scaling.factor ({rope['factor']}): only max_position_embeddings / "
                          f"original_max_position_embeddings ({max_len / orig}) is implemented")
    return {"type": "longrope", **{k: rope.get(k) for k in keys}}


def from_hf_config(path: str | Path) -> MiniCPMConfig:
    """A Hugging Face MiniCPM config.json (file or directory) -> the config. Raises ConfigError naming every
    key it refuses (unknown, or a value whose math is not implemented here)."""
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"Hugging Face config not found: {path}")
    raw = json.loads(path.read_text())
    values = {_HF_KEYS[k]: v for k, v in raw.items() if k in _HF_KEYS and v is not None}
    values.setdefault("tie_word_embeddings", True)  # MiniCPM's own default
    if raw.get("rope_scaling") is not None:
        values["rope_scaling"] = _rope_from_hf(raw["rope_scaling"], raw.get("max_position_embeddings"))
    problems = [f"{k} = {raw[k]!r}: only {' or '.join(map(repr, ok))} is implemented"
                for k, ok in _HF_FIXED.items() if k in raw and raw[k] not in ok]
    known = set(_HF_KEYS) | set(_HF_FIXED) | _HF_METADATA | {"rope_scaling"}
    problems += [f"{k}: unknown key; it may change the model's math, so it is refused" for k in sorted(set(raw) - known)]
    if problems:
        raise ConfigError("\n".join([f"{path}: not a MiniCPM this engine implements exactly:", *(f"  {p}" for p in problems)]))
    try:
        return MiniCPMConfig(name=str(path), **values)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join([f"invalid model config ({path}):", *lines])) from None


_RELEASED = Path(__file__).parent / "data" / "released"  # the published config.json of the released model

_8B = from_hf_config(_RELEASED / "minicpm4-8b.json").model_copy(update={"name": "minicpm4-8b"})

PRESETS: dict[str, MiniCPMConfig] = {
    "minicpm4-8b": _8B,
    # 8B per-head shapes (head dim 128, GQA 16:1 on 2 KV heads, the released LongRoPE factors), toy size elsewhere
    "minicpm4-8b-reduced": _8B.model_copy(update={
        "name": "minicpm4-8b-reduced", "hidden_size": 256, "num_layers": 2, "ffn_hidden_size": 512,
        "vocab_size": 512, "head_dim": 128}),
}


def preset(name: str) -> MiniCPMConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def hf_param_shapes(cfg: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    """Every trainable parameter by its HF MiniCPM name, in module order (the model's order too)."""
    h, d, n, g, f = cfg.hidden_size, cfg.dim_head, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (n * d, h),
            p + "self_attn.k_proj.weight": (g * d, h),
            p + "self_attn.v_proj.weight": (g * d, h),
            p + "self_attn.o_proj.weight": (h, n * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes
