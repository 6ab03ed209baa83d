"""`pretrain`: the shared loop (core/pretrain.py: data, resume, steps, logs, checkpoints) with this engine's model
part: build.py's Trainer on the ("dp", "tp") layout, the run config written beside the checkpoints (run_config.py),
the step as the core's CUDA graph where it applies (core/cuda_graph.py: by default at TP=1 on one GPU; under
tensor parallelism it is refused, its collectives are not captured)."""

from __future__ import annotations

import torch

from train_engine_8b import run_config
from train_engine_8b.build import build_trainer
from train_engine_8b.config import EngineConfig
from train_engine_8b.core import pretrain as core_pretrain
from train_engine_8b.core.cuda_graph import step_function
from train_engine_8b.core.dist import DistContext
from train_engine_8b.core.trainer import Trainer


def _build(cfg: EngineConfig, ctx: DistContext, initial: dict | None, dtype: torch.dtype) -> Trainer:
    return build_trainer(cfg, ctx, initial, dtype=dtype)


ENGINE = core_pretrain.EngineParts(build_trainer=_build, step_function=step_function,
                                   ops_record=lambda trainer: trainer.model.op_record, write_config=run_config.write)


def run(cfg: EngineConfig) -> dict:
    """Train per `cfg`; returns a summary (rank 0's view). Raises EngineError on bad input."""
    return core_pretrain.run(cfg, ENGINE)
