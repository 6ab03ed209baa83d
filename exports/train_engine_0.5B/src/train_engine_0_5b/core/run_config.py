"""`pretrain --config run.toml`: the typed EngineConfig (engine_config.py) as a TOML file, and the resolved
config of a run written beside its checkpoints (SAVE_DIR/config.toml, itself a valid --config), for every engine
(its presets and program name handed in):

    model = "tiny"              # a preset, model .toml or HF config.json; or a [model] table of MiniCPMConfig
                                # fields (`preset = "tiny"` starts from a preset)
    ops = "attention=sdpa"      # the --ops form, or an [ops] table
    [train]                     # then the sections: train, optim, data, checkpoint, runtime
    num_steps = 20

Types are strict (`num_steps = true` is an error); relative paths are relative to the working directory, as
on the command line; options given on the command line override the file, field by field.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from ..minicpm.config import MiniCPMConfig
from ..minicpm.config_files import Presets, from_dict, load
from ..ops.registry import OpSelection
from .engine_config import EngineConfig
from .errors import EngineError

SECTIONS = ("train", "optim", "data", "checkpoint", "runtime")
FILE_NAME = "config.toml"


def read(path: Path) -> dict[str, Any]:
    """The file's values: "model" and "ops" as written (str or table), each section a dict."""
    if not path.is_file():
        raise EngineError(f"--config {path}: no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"--config {path}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"model", "ops", *SECTIONS})
    if unknown:
        raise EngineError(f"--config {path}: unknown key {unknown[0]!r} (expected model, ops, {', '.join(SECTIONS)})")
    for name in SECTIONS:
        if not isinstance(data.get(name, {}), dict):
            raise EngineError(f"--config {path}: `{name}` must be a table ([{name}])")
    return data


def model_from(value: Any, source: str, presets: Presets) -> MiniCPMConfig:
    if isinstance(value, str):
        return load(value, presets)
    if isinstance(value, dict):
        return from_dict(value, source, presets)
    raise EngineError(f"{source}: `model` must be a string (preset or path) or a [model] table")


def ops_from(value: Any, source: str) -> OpSelection:
    if isinstance(value, str):
        return OpSelection.parse(value)
    if isinstance(value, dict):
        try:
            return OpSelection(**value)
        except ValueError as e:
            raise EngineError(f"{source}: [ops]: {e}") from None
    raise EngineError(f"{source}: `ops` must be a string (op=impl,...) or an [ops] table")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else "nan" if v != v else "inf" if v > 0 else "-inf"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def _table(name: str, values: dict) -> list[str]:
    lines = [f"[{name}]"]
    nested = []
    for key, v in values.items():
        if isinstance(v, dict):
            nested.append((f"{name}.{key}", v))
        elif v is not None:  # TOML has no null: a missing key takes the default, None
            lines.append(f"{key} = {_value(v)}")
    for sub in nested:
        lines += ["", *_table(*sub)]
    return lines


def to_toml(cfg: EngineConfig, prog: str) -> str:
    """The TOML form of `cfg`; `prog`: the engine's program name, for the header line."""
    data = cfg.model_dump(mode="json")
    lines = [f"# the resolved config of this run ({prog} pretrain --config FILE reads it)"]
    for name in ("model", "ops", *SECTIONS):
        lines += ["", *_table(name, data[name])]
    return "\n".join(lines) + "\n"


def write(cfg: EngineConfig, save_dir: Path, prog: str) -> Path:
    """SAVE_DIR/config.toml, replaced atomically (rank 0, once the run's inputs are checked)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    out, tmp = save_dir / FILE_NAME, save_dir / f".tmp-{FILE_NAME}"
    tmp.write_text(to_toml(cfg, prog), encoding="utf-8")
    os.replace(tmp, out)
    return out
