"""`pretrain`: the shared loop (core/pretrain.py: data, resume, steps, logs, checkpoints) with this engine's model
part: build.py's Trainer on the ("dp", "tp") layout, the run config written beside the checkpoints (run_config.py).
No CUDA graph yet."""

from __future__ import annotations

import torch

from train_engine_8b import run_config
from train_engine_8b.build import build_trainer
from train_engine_8b.config import EngineConfig
from train_engine_8b.core import pretrain as core_pretrain
from train_engine_8b.core.dist import DistContext
from train_engine_8b.core.errors import EngineError
from train_engine_8b.core.trainer import Trainer


def _build(cfg: EngineConfig, ctx: DistContext, initial: dict | None, dtype: torch.dtype) -> Trainer:
    return build_trainer(cfg, ctx, initial, dtype=dtype)


def _step_function(trainer: Trainer, cfg: EngineConfig, rows: int):
    if cfg.runtime.cuda_graph:
        raise EngineError("--cuda-graph: this engine does not capture its step yet (use --no-cuda-graph)")
    return trainer.train_step, False


ENGINE = core_pretrain.EngineParts(build_trainer=_build, step_function=_step_function,
                                   ops_record=lambda trainer: trainer.model.op_record, write_config=run_config.write)


def run(cfg: EngineConfig) -> dict:
    """Train per `cfg`; returns a summary (rank 0's view). Raises EngineError on bad input."""
    return core_pretrain.run(cfg, ENGINE)
