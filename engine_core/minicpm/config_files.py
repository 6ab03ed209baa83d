"""Model configs from names and files, over an engine's presets: `load` (a preset name, a model .toml, a HF
config.json or its directory), `from_toml` (strict: unknown keys are errors), `from_dict` (a TOML table;
`preset = "..."` starts from a preset and overrides the fields given)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError, MiniCPMConfig, build_config
from .hf_config import from_hf_config

Presets = Mapping[str, MiniCPMConfig]


def preset(name: str, presets: Presets) -> MiniCPMConfig:
    if name not in presets:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(presets)}")
    return presets[name]


def from_toml(path: str | Path, presets: Presets) -> MiniCPMConfig:
    """A TOML file with the fields of MiniCPMConfig at top level or under [model]; `preset = "..."`
    starts from a preset and overrides the fields given."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(data.get("model", data), str(path), presets)


def from_dict(values: dict[str, Any], source: str, presets: Presets) -> MiniCPMConfig:
    """MiniCPMConfig fields (a TOML table); `preset = "..."` starts from a preset and overrides the fields given."""
    data = dict(values)
    base = data.pop("preset", None)
    if base is not None:
        merged = preset(base, presets).model_dump() | data
        merged.pop("name")
        return build_config(data.get("name", base), {k: v for k, v in merged.items() if k != "name"})
    return build_config(str(data.pop("name", source)), data)


def load(spec: str | Path, presets: Presets) -> MiniCPMConfig:
    """A preset name, a .toml file, or a HF config.json / model directory."""
    s = str(spec)
    if s in presets:
        return presets[s]
    p = Path(s)
    if p.suffix == ".toml":
        return from_toml(p, presets)
    if p.suffix == ".json" or p.is_dir():
        return from_hf_config(p)[0]
    raise ConfigError(f"model {s!r} is neither a preset ({', '.join(presets)}) nor a .toml / config.json path")
