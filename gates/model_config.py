"""MiniCPM4 model configuration: the one typed description of the model every stack trains.

Presets (`PRESETS`) are values; variants derive from them with `preset.model_copy(update=...)`. The
released models' presets are their published config.json files (data/released/), read by `from_hf_config`.
Loaders: `from_toml` (strict: unknown keys are errors) and `from_hf_config` (a Hugging Face MiniCPM
`config.json`: every key that shapes the math is mapped; metadata keys are reported and ignored; a key or
value that would change the math in a way not implemented here is refused).
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A model config that cannot be used; the message names the offending field."""


class LinearRope(BaseModel):
    """Positions divided by `factor` (HF `linear`, MiniCPM's linear-scaling rotary embedding)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["linear"] = "linear"
    factor: float = Field(gt=0)


class LongRope(BaseModel):
    """LongRoPE (MiniCPM4's and HF's `longrope`): the inverse frequency of rotary pair i is divided by
    short_factor[i] for sequences up to original_max_position_embeddings and by long_factor[i] beyond; cos
    and sin are scaled by sqrt(1 + ln(m / o) / ln(o)) when max_seq_length m exceeds o, else by 1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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

    model_config = ConfigDict(extra="forbid", frozen=True)

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


def _build(name: str, values: dict[str, Any]) -> MiniCPMConfig:
    try:
        return MiniCPMConfig(name=name, **values)
    except ValidationError as e:
        raise ConfigError(_describe(e, source=name)) from None


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


def _describe(e: ValidationError, source: str) -> str:
    return "\n".join([f"invalid model config ({source}):", *validation_lines(e)])


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
    data = dict(data.get("model", data))
    base = data.pop("preset", None)
    name = data.pop("name", base or str(path))
    if base is not None:
        values = preset(base).model_dump(exclude={"name"}) | data
        return _build(name, values)
    return _build(name, data)


# HF MiniCPM config.json key -> our field: the keys that shape the math, mapped one to one.
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
    "partial_rotary_factor": (1, 1.0),
}
# Keys that do not change the training math (inference, initialization, tokens, provenance): ignored.
_HF_METADATA = frozenset({
    "_name_or_path", "architectures", "auto_map", "bos_token_id", "eos_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "pretraining_tp", "mup_denominator",
    "_attn_implementation", "return_dict", "output_attentions", "output_hidden_states", "tokenizer_class",
})
_ROPE_TYPES = ("linear", "longrope")  # besides none ("default")


def _rope_from_hf(raw: dict[str, Any], values: dict[str, Any], problems: list[str]) -> None:
    """rope_scaling (or transformers 5's rope_parameters) -> values["rope_scaling"] / values["rope_theta"]."""
    given = [k for k in ("rope_scaling", "rope_parameters") if raw.get(k) is not None]
    if not given:
        return
    if len(given) == 2 and raw["rope_scaling"] != raw["rope_parameters"]:
        problems.append("rope_scaling and rope_parameters disagree")
        return
    rope = raw[given[0]]
    if not isinstance(rope, dict):
        problems.append(f"{given[0]}: expected an object, got {rope!r}")
        return
    rope = dict(rope)
    kinds = {rope.pop(k) for k in ("rope_type", "type") if k in rope}
    kind = kinds.pop() if len(kinds) == 1 else "default" if not kinds else None
    if kind is None:
        problems.append(f"{given[0]}: rope_type and type disagree")
        return
    theta = rope.pop("rope_theta", None)
    if theta is not None:
        if values.setdefault("rope_theta", theta) != theta:
            problems.append(f"{given[0]}.rope_theta ({theta}) differs from rope_theta ({values['rope_theta']})")
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"{given[0]}.partial_rotary_factor: only full rotary heads (1.0) are implemented")
    if kind == "default":
        rest = sorted(rope)
    elif kind == "linear":
        values["rope_scaling"] = {"type": "linear", **({"factor": rope.pop("factor")} if "factor" in rope else {})}
        rest = sorted(rope)
    elif kind == "longrope":
        factor = rope.pop("factor", None)
        keys = ("short_factor", "long_factor", "original_max_position_embeddings")
        values["rope_scaling"] = {"type": "longrope", **{k: rope.pop(k) for k in keys if k in rope}}
        orig, longest = values["rope_scaling"].get("original_max_position_embeddings"), raw.get("max_position_embeddings")
        if factor is not None and isinstance(orig, int) and isinstance(longest, int) and factor != longest / orig:
            problems.append(f"{given[0]}.factor ({factor}): only max_position_embeddings / original_max_position_"
                            f"embeddings ({longest / orig}) is implemented (MiniCPM's code reads no factor)")
        rest = sorted(rope)
    else:
        problems.append(f"{given[0]}: rope type {kind!r} is not implemented (implemented: none, {', '.join(_ROPE_TYPES)})")
        return
    for key in rest:  # e.g. attention_factor, which MiniCPM's code ignores and transformers' applies
        problems.append(f"{given[0]}.{key}: not implemented for rope type {kind!r}")


def from_hf_config(path: str | Path) -> tuple[MiniCPMConfig, list[str]]:
    """Load a Hugging Face MiniCPM config.json (file or directory). Returns the config and the metadata
    keys that were ignored. Raises ConfigError naming every key it refuses: an unknown key, or a value
    (an activation, a rope type, sparse attention, ...) whose math is not implemented here."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"Hugging Face config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a config object")
    values = {_HF_KEYS[k]: v for k, v in raw.items() if k in _HF_KEYS and v is not None}
    values.setdefault("tie_word_embeddings", True)  # MiniCPM's own default
    problems: list[str] = []
    _rope_from_hf(raw, values, problems)
    for key, allowed in _HF_FIXED.items():
        if key in raw and raw[key] not in allowed:
            problems.append(f"{key} = {raw[key]!r}: only {' or '.join(map(repr, allowed))} is implemented")
    known = set(_HF_KEYS) | set(_HF_FIXED) | _HF_METADATA | {"rope_scaling", "rope_parameters"}
    problems += [f"{k}: unknown key; it may change the model's math, so it is refused" for k in sorted(set(raw) - known)]
    if problems:
        raise ConfigError("\n".join([f"{path}: not a MiniCPM this workspace implements exactly:",
                                      *(f"  {p}" for p in problems)]))
    return _build(str(path), values), sorted(k for k in raw if k in _HF_METADATA)


def to_hf_minicpm_config(cfg: MiniCPMConfig) -> dict[str, Any]:
    """The inverse of from_hf_config, for writing a MiniCPM config.json (rope_scaling in the released files' form)."""
    inv = {v: k for k, v in _HF_KEYS.items()}
    out = {inv[k]: v for k, v in cfg.model_dump().items() if k in inv and v is not None}
    out["head_dim"] = cfg.dim_head
    if cfg.rope_scaling is not None:
        rope = cfg.rope_scaling.model_dump()
        out["rope_scaling"] = {"rope_type": rope.pop("type"), **{k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in rope.items()}}
    out.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"], hidden_act="silu")
    return out


_RELEASED = Path(__file__).parent / "data" / "released"  # the published config.json of each released model


def _released(name: str) -> MiniCPMConfig:
    return from_hf_config(_RELEASED / f"{name}.json")[0].model_copy(update={"name": name})


PRESETS: dict[str, MiniCPMConfig] = {
    "minicpm4-0.5b": _released("minicpm4-0.5b"),
    "minicpm4-8b": _released("minicpm4-8b"),
    # The 8B's per-head shapes (head dim 128, 32 heads on 2 KV heads, untied, LongRoPE, pad 2) at toy width and
    # depth, vocab = the default tokenizer's size: the 8B engine's gates at TP=2 on a CPU (its preset of the same name)
    "minicpm4-8b-reduced": _released("minicpm4-8b").model_copy(update={
        "name": "minicpm4-8b-reduced", "hidden_size": 256, "num_layers": 2, "ffn_hidden_size": 512,
        "vocab_size": 4096, "head_dim": 128}),
    # The 8B's shapes at 8 of its 32 layers (13.985 GFLOP/token at seq 4096): one H200 holds its whole step, and
    # the 8B's performance anchors (megatron-core, torch.compile, eager) were measured at this depth
    "minicpm4-8b-8l": _released("minicpm4-8b").model_copy(update={"name": "minicpm4-8b-8l", "num_layers": 8}),
    # Same math at toy size: every gate runs on a CPU in seconds. Vocab = the default tokenizer's size.
    "tiny": MiniCPMConfig(
        name="tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        ffn_hidden_size=176, vocab_size=4096, max_seq_length=1024, tie_word_embeddings=True,
    ),
}


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
