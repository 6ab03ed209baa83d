"""`pretrain --config run.toml` and SAVE_DIR/config.toml: the core's (core/run_config.py, its doc has the format)
with this engine's presets and program name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train_engine_0_5b.config import EngineConfig
from train_engine_0_5b.core import run_config as core
from train_engine_0_5b.core.run_config import FILE_NAME, SECTIONS, ops_from, read
from train_engine_0_5b.model_config import PRESETS, MiniCPMConfig

__all__ = ["FILE_NAME", "SECTIONS", "model_from", "ops_from", "read", "to_toml", "write"]
PROG = "train_engine_0_5b"


def model_from(value: Any, source: str) -> MiniCPMConfig:
    return core.model_from(value, source, PRESETS)


def to_toml(cfg: EngineConfig) -> str:
    return core.to_toml(cfg, PROG)


def write(cfg: EngineConfig, save_dir: Path) -> Path:
    return core.write(cfg, save_dir, PROG)
