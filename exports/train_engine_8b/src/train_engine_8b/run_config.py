"""`pretrain --config run.toml` and SAVE_DIR/config.toml: the core's (core/run_config.py, its doc has the format;
`[runtime] tp` is the tensor-parallel degree) with this engine's presets and program name."""

from __future__ import annotations

from pathlib import Path

from train_engine_8b.config import EngineConfig
from train_engine_8b.core import run_config as core

PROG = "train_engine_8b"


def write(cfg: EngineConfig, save_dir: Path) -> Path:
    return core.write(cfg, save_dir, PROG)
