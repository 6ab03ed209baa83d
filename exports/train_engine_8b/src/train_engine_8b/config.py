"""The engine's typed configuration: the core's root (core/engine_config.py: the model beside the core's
sections, core/config.py, where `runtime.tp` is the tensor-parallel degree), re-exported for the engine."""

from __future__ import annotations

from train_engine_8b.core.engine_config import EngineConfig, build

__all__ = ["EngineConfig", "build"]
