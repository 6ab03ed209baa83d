"""Hugging Face MiniCPM config.json <-> MiniCPMConfig.

`from_hf_config` maps every key that shapes the math, reports the metadata keys it ignores and refuses a key
or value that would change the math in a way the engines do not implement; `to_hf_minicpm_config` writes the
released files' form back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ConfigError, MiniCPMConfig, build_config


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
        values["rope_scaling"] = {"type": "linear", "factor": rope.pop("factor", None)}
        rest = sorted(rope)
    elif kind == "longrope":
        factor = rope.pop("factor", None)
        keys = ("short_factor", "long_factor", "original_max_position_embeddings")
        values["rope_scaling"] = {"type": "longrope", **{k: rope.pop(k, None) for k in keys}}
        orig, longest = values["rope_scaling"]["original_max_position_embeddings"], raw.get("max_position_embeddings")
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
    return build_config(str(path), values), sorted(k for k in raw if k in _HF_METADATA)


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
