"""The engine's typed configuration: the core's root (core/engine_config.py: the model beside the core's
sections, core/config.py), re-exported for the engine's modules."""

from __future__ import annotations

from train_engine_0_5b.core.engine_config import EngineConfig, build

__all__ = ["EngineConfig", "build"]
