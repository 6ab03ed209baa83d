"""This engine's MiniCPM4 model configs: the presets it is specialized for and the loaders that reach them.

The config itself (MiniCPMConfig, its HF config.json reader and writer, hf_param_shapes) is the MiniCPM family's,
shared by the engines through the vendored core (minicpm/); it is re-exported here for the engine's modules.

Presets (`PRESETS`) are values; variants derive from them with `preset.model_copy(update=...)`. The
released models' presets are their published config.json files (data/released/), read by `from_hf_config`.
Loaders: `from_toml` (strict: unknown keys are errors) and `from_hf_config` (a Hugging Face MiniCPM
`config.json`: every key that shapes the math is mapped; metadata keys are reported and ignored; a key or
value that would change the math in a way not implemented here is refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train_engine_0_5b.minicpm import config_files
from train_engine_0_5b.minicpm.config import (ConfigError, LinearRope, LongRope, MiniCPMConfig, RopeScaling,
                                              hf_param_shapes, validation_lines)
from train_engine_0_5b.minicpm.hf_config import from_hf_config, to_hf_minicpm_config

__all__ = ["ConfigError", "LinearRope", "LongRope", "MiniCPMConfig", "PRESETS", "RopeScaling", "from_dict",
           "from_hf_config", "from_toml", "hf_param_shapes", "load", "preset", "to_hf_minicpm_config",
           "validation_lines"]


def preset(name: str) -> MiniCPMConfig:
    return config_files.preset(name, PRESETS)


def from_toml(path: str | Path) -> MiniCPMConfig:
    """A TOML file with the fields of MiniCPMConfig at top level or under [model] (minicpm/config_files.py)."""
    return config_files.from_toml(path, PRESETS)


def from_dict(values: dict[str, Any], source: str) -> MiniCPMConfig:
    """MiniCPMConfig fields (a TOML table); `preset = "..."` starts from a preset."""
    return config_files.from_dict(values, source, PRESETS)


_RELEASED = Path(__file__).parent / "data" / "released"  # the published config.json of each released model


def _released(name: str) -> MiniCPMConfig:
    return from_hf_config(_RELEASED / f"{name}.json")[0].model_copy(update={"name": name})


PRESETS: dict[str, MiniCPMConfig] = {
    "minicpm4-0.5b": _released("minicpm4-0.5b"),
    # Same math at toy size: every gate runs on a CPU in seconds. Vocab = the default tokenizer's size.
    "tiny": MiniCPMConfig(
        name="tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        ffn_hidden_size=176, vocab_size=4096, max_seq_length=1024, tie_word_embeddings=True,
    ),
}


def load(spec: str | Path) -> MiniCPMConfig:
    """A preset name, a .toml file, or a HF config.json / model directory."""
    return config_files.load(spec, PRESETS)
