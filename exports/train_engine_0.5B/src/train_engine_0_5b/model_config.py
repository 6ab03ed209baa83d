"""MiniCPM4 model configuration: the typed description of the model this engine trains.

Vendored from the workspace's gates/model_config.py (the engine imports nothing from the workspace);
trimmed to the presets this engine is specialized for, plus `hf_param_shapes` (HF MiniCPM names).

Presets (`PRESETS`) are values; variants derive from them with `preset.model_copy(update=...)`.
Loaders: `from_toml` (strict: unknown keys are errors) and `from_hf_config` (a Hugging Face
MiniCPM `config.json`: known keys are mapped, the rest are reported and ignored).
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A model config that cannot be used; the message names the offending field."""


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


def _build(name: str, values: dict[str, Any]) -> MiniCPMConfig:
    try:
        return MiniCPMConfig(name=name, **values)
    except ValidationError as e:
        raise ConfigError(_describe(e, source=name)) from None


def _describe(e: ValidationError, source: str) -> str:
    lines = [f"invalid model config ({source}):"]
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(config)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


PRESETS: dict[str, MiniCPMConfig] = {
    "minicpm4-0.5b": MiniCPMConfig(
        name="minicpm4-0.5b", hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=2,
        ffn_hidden_size=4096, vocab_size=73448, max_seq_length=32768, tie_word_embeddings=True,
    ),
    # Same math at toy size: every gate runs on a CPU in seconds. Vocab = the default tokenizer's size.
    "tiny": MiniCPMConfig(
        name="tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        ffn_hidden_size=176, vocab_size=4096, max_seq_length=1024, tie_word_embeddings=True,
    ),
}


def preset(name: str) -> MiniCPMConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def from_toml(path: str | Path) -> MiniCPMConfig:
    """A TOML file with the fields of MiniCPMConfig at top level or under [model]; `preset = "..."`
    starts from a preset and overrides the fields given."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(data.get("model", data), str(path))


def from_dict(values: dict[str, Any], source: str) -> MiniCPMConfig:
    """MiniCPMConfig fields (a TOML table); `preset = "..."` starts from a preset and overrides the fields given."""
    data = dict(values)
    base = data.pop("preset", None)
    if base is not None:
        merged = preset(base).model_dump() | data
        merged.pop("name")
        return _build(data.get("name", base), {k: v for k, v in merged.items() if k != "name"})
    return _build(str(data.pop("name", source)), data)


# HF MiniCPM config.json key -> our field. Keys not here are ignored (reported by from_hf_config).
_HF_KEYS = {
    "hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim", "intermediate_size": "ffn_hidden_size",
    "vocab_size": "vocab_size", "max_position_embeddings": "max_seq_length", "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta", "scale_emb": "scale_emb", "scale_depth": "scale_depth",
    "dim_model_base": "dim_model_base", "tie_word_embeddings": "tie_word_embeddings",
}


def from_hf_config(path: str | Path) -> tuple[MiniCPMConfig, list[str]]:
    """Load a Hugging Face MiniCPM config.json (file or directory). Returns the config and the keys
    that were ignored (e.g. rope_scaling: LongRoPE is inference-time, out of scope for pretraining)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"Hugging Face config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    values = {_HF_KEYS[k]: v for k, v in raw.items() if k in _HF_KEYS and v is not None}
    values.setdefault("tie_word_embeddings", True)  # MiniCPM's own default
    ignored = sorted(k for k in raw if k not in _HF_KEYS)
    return _build(str(path), values), ignored


def to_hf_minicpm_config(cfg: MiniCPMConfig) -> dict[str, Any]:
    """The inverse of from_hf_config, for writing a MiniCPM config.json."""
    inv = {v: k for k, v in _HF_KEYS.items()}
    out = {inv[k]: v for k, v in cfg.model_dump().items() if k in inv}
    out["head_dim"] = cfg.dim_head
    out.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"], hidden_act="silu")
    return out


def load(spec: str | Path) -> MiniCPMConfig:
    """A preset name, a .toml file, or a HF config.json / model directory."""
    s = str(spec)
    if s in PRESETS:
        return PRESETS[s]
    p = Path(s)
    if p.suffix == ".toml":
        return from_toml(p)
    if p.suffix == ".json" or p.is_dir():
        return from_hf_config(p)[0]
    raise ConfigError(f"model {s!r} is neither a preset ({', '.join(PRESETS)}) nor a .toml / config.json path")


def hf_param_shapes(cfg: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    """Every trainable parameter by its HF MiniCPM name, in module order (the engine's order too)."""
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
