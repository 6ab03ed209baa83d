"""`pretrain`: the shared loop (core/pretrain.py: data, resume, steps, logs, checkpoints) with this engine's
model part: build.py's Trainer (ops from the registry), parallelize.py's step function (the CUDA graph), the
run config written beside the checkpoints (run_config.py)."""

from __future__ import annotations

import torch

from train_engine_0_5b import run_config
from train_engine_0_5b.build import build_trainer
from train_engine_0_5b.config import EngineConfig
from train_engine_0_5b.core import pretrain as core_pretrain
from train_engine_0_5b.core.cuda_graph import step_function
from train_engine_0_5b.core.dist import DistContext
from train_engine_0_5b.core.trainer import Trainer
from train_engine_0_5b.ops.cases import Dims
from train_engine_0_5b.ops.registry import resolve


def _build(cfg: EngineConfig, ctx: DistContext, initial: dict | None, dtype: torch.dtype) -> Trainer:
    dims = Dims.of_model(cfg.model, cfg.train.micro_batch_size, cfg.train.seq_length)  # what `auto` must run
    return build_trainer(cfg, ctx, resolve(cfg.ops, ctx.device.type, dtype, dims=dims), initial, dtype=dtype)


ENGINE = core_pretrain.EngineParts(build_trainer=_build, step_function=step_function,
                                   ops_record=lambda trainer: trainer.model.ops.record(), write_config=run_config.write)


def run(cfg: EngineConfig) -> dict:
    """Train per `cfg`; returns a summary (rank 0's view). Raises EngineError on bad input."""
    return core_pretrain.run(cfg, ENGINE)
