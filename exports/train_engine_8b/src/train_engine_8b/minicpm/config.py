"""MiniCPM4's typed model config: the fields, their checks and the values derived from them.

Every MiniCPM engine describes its model with `MiniCPMConfig` (so configs, checkpoints and the HF layout are
interchangeable between engines); presets and file loaders are each engine's (its model_config.py).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A model config that cannot be used; the message names the offending field."""


class LinearRope(BaseModel):
    """Positions divided by `factor` (HF `linear`, MiniCPM's linear-scaling rotary embedding)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["linear"] = "linear"
    factor: float = Field(gt=0)


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


RopeScaling = Annotated[LinearRope | LongRope, Field(discriminator="type")]


class MiniCPMConfig(BaseModel):
    """Llama-shaped decoder with MiniCPM's muP-style scales (see DESIGN.md, "The models")."""

    # strict: `num_layers = true` is an error, not a 1-layer model (an int still fills a float field)
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
    rope_scaling: RopeScaling | None = Field(None, description="None: plain RoPE")
    pad_token_id: int | None = Field(
        None, ge=0, description="the embedding's padding_idx, as MiniCPM's: that row gets no gradient from the lookup")

    @model_validator(mode="after")
    def _check_shapes(self) -> "MiniCPMConfig":
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size}) "
                "unless head_dim is given"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.dim_head % 2:
            raise ValueError(f"head_dim ({self.dim_head}) must be even for RoPE")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be below vocab_size ({self.vocab_size})")
        rope = self.rope_scaling
        if isinstance(rope, LongRope):
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

    # Derived values: one place so no stack re-derives them differently.
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

    def differences(self, other: "MiniCPMConfig") -> list[str]:
        """The fields whose values give another model (name ignored, head_dim as resolved), one
        `field: this vs other` line each; [] for the same math."""
        mine = self.model_dump(exclude={"name"}) | {"head_dim": self.dim_head}
        theirs = other.model_dump(exclude={"name"}) | {"head_dim": other.dim_head}
        return [f"{k}: {_short(mine[k])} vs {_short(theirs[k])}" for k in mine if mine[k] != theirs[k]]

    def rope_at(self, seq_len: int) -> tuple[tuple[float, ...] | None, float]:
        """RoPE for positions 0..seq_len-1: the divisor of each rotary pair's inverse frequency
        theta^(-2i/d) (None: plain RoPE) and the factor on cos and sin. Every stack builds its tables from this."""
        rope = self.rope_scaling
        if rope is None:
            return None, 1.0
        if isinstance(rope, LinearRope):
            return (rope.factor,) * (self.dim_head // 2), 1.0
        long = seq_len > rope.original_max_position_embeddings
        return (rope.long_factor if long else rope.short_factor), rope.cos_sin_scale(self.max_seq_length)

    def num_params(self) -> int:
        """Trainable parameters (embedding counted once when tied)."""
        h, d = self.hidden_size, self.dim_head
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * h * self.ffn_hidden_size
        per_layer = attn + mlp + 2 * h
        out = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + out

    def flops_per_token(self, seq_length: int) -> float:
        """Megatron-LM v0.15 training FLOPs per token (causal attention halved), DESIGN.md's formula."""
        h, L, s = self.hidden_size, self.num_layers, seq_length
        n, g, d, f, V = self.num_heads, self.num_kv_heads, self.dim_head, self.ffn_hidden_size, self.vocab_size
        return 6.0 * (L * (2 * h * n * d + 2 * h * g * d + 3 * h * f + s * n * d) + h * V)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def build_config(name: str, values: dict[str, Any]) -> MiniCPMConfig:
    """MiniCPMConfig(name=name, **values); a ConfigError naming every offending field instead of pydantic's."""
    try:
        return MiniCPMConfig(name=name, **values)
    except ValidationError as e:
        raise ConfigError("\n".join([f"invalid model config ({name}):", *validation_lines(e)])) from None


def validation_lines(e: ValidationError, whole: str = "(config)") -> list[str]:
    """One `  field.path: message` line per pydantic error; shared by every typed config in the workspace
    (model, case, forge spec) so each names the offending field the same way."""
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or whole
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key missing"
        lines.append(f"  {field}: {msg}")
    return lines


def hf_param_shapes(cfg: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    """Every trainable parameter by its HF MiniCPM name, in module order (every engine's model order too)."""
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


def check_hf_names(cfg: MiniCPMConfig, model) -> None:
    """Raise AssertionError unless `model`'s parameter names and shapes are HF MiniCPM's, in the same order."""
    got = {k: tuple(p.shape) for k, p in model.named_parameters()}
    if list(got.items()) != list(hf_param_shapes(cfg).items()):
        raise AssertionError("model parameters drifted from HF MiniCPM names")
