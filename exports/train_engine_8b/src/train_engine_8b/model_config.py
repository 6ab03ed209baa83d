"""MiniCPM4 model configs of the 8B engine: its presets.

The config itself (MiniCPMConfig, LongRoPE, the HF config.json reader, hf_param_shapes) is the MiniCPM family's,
shared with the 0.5B engine through the vendored core (minicpm/); it is re-exported here for the engine's modules.

Presets (`PRESETS`) are values; variants derive with `preset.model_copy(update=...)`:
- `minicpm4-8b`: the published config.json (data/released/minicpm4-8b.json), read by `from_hf_config`;
- `minicpm4-8b-reduced`: the same math and per-head shapes (head dim 128, 32 heads on 2 KV heads, untied,
  LongRoPE, pad 2) at toy width, depth and vocab: TP tests run it on a CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path

from train_engine_8b.minicpm import config_files
from train_engine_8b.minicpm.config import ConfigError, LongRope, MiniCPMConfig, hf_param_shapes
from train_engine_8b.minicpm.hf_config import from_hf_config

__all__ = ["ConfigError", "LongRope", "MiniCPMConfig", "PRESETS", "from_hf_config", "hf_param_shapes", "load", "preset"]

_RELEASED = Path(__file__).parent / "data" / "released"  # the published config.json of the released model

_8B = from_hf_config(_RELEASED / "minicpm4-8b.json")[0].model_copy(update={"name": "minicpm4-8b"})

PRESETS: dict[str, MiniCPMConfig] = {
    "minicpm4-8b": _8B,
    # 8B per-head shapes (head dim 128, GQA 16:1 on 2 KV heads, the released LongRoPE factors), toy size elsewhere;
    # vocab 4096: the shipped tokenizer's, so checkpoints and HF exports of the preset carry it
    "minicpm4-8b-reduced": _8B.model_copy(update={
        "name": "minicpm4-8b-reduced", "hidden_size": 256, "num_layers": 2, "ffn_hidden_size": 512,
        "vocab_size": 4096, "head_dim": 128}),
}


def preset(name: str) -> MiniCPMConfig:
    return config_files.preset(name, PRESETS)


def load(spec: str | Path) -> MiniCPMConfig:
    """A preset name, a model .toml, or a Hugging Face MiniCPM config.json (or its directory)."""
    return config_files.load(spec, PRESETS)
