"""One setup path: `build_trainer` turns an EngineConfig into a ready Trainer (the model with
parallelize.py's steps 1-3, AdamW, the LR schedule, the data-parallel reducer). `pretrain`, `bench` and `probe` each state their run as an EngineConfig and call
it, so the three cannot disagree on how a step is built.
"""

from __future__ import annotations

import torch

from train_engine_0_5b.config import EngineConfig
from train_engine_0_5b.core.dist import DistContext
from train_engine_0_5b.core.errors import EngineError
from train_engine_0_5b.core.optim import AdamW, Schedule
from train_engine_0_5b.core.trainer import Trainer
from train_engine_0_5b.core.weights import Initial, local_masters
from train_engine_0_5b.minicpm.init import init_weights
from train_engine_0_5b.model import build_model
from train_engine_0_5b.ops.registry import Ops
from train_engine_0_5b.parallelize import parallelize_model


def build_trainer(cfg: EngineConfig, ctx: DistContext, ops: Ops, initial: Initial | None = None, *,
                  dtype: torch.dtype, master_dtype: torch.dtype = torch.float32) -> Trainer:
    """The Trainer of `cfg`'s run on `ctx`, its model in `dtype` with `ops`.

    `initial`: master weights by HF name (a checkpoint's or a probe case's) or --init-from's lazy reader
    (core/weights.py: read a tensor at a time); None: fresh
    weights from train.init_std and train.seed. A checkpoint's moments and step are loaded afterwards
    (`trainer.optimizer.load`), which also works once ZeRO-1 has sharded the optimizer."""
    t, o = cfg.train, cfg.optim
    if cfg.runtime.tp != 1:  # the 0.5B fits one rank: its model has no tensor-parallel layout
        raise EngineError(f"--tp {cfg.runtime.tp}: this engine is data parallel only (--tp 1)")
    model = parallelize_model(build_model(cfg.model, ops, ctx.device, dtype), cfg.runtime)
    params = dict(model.named_parameters())  # from --init-from's reader each rank reads only what it holds
    master = local_masters(initial, params) if initial is not None else init_weights(cfg.model, t.init_std, t.seed)
    optimizer = AdamW(params, master, adamw_op=ops.adamw, betas=o.betas, eps=o.eps,
                      weight_decay=o.weight_decay, master_dtype=master_dtype)
    schedule = Schedule(o.lr_schedule, o.lr, o.min_lr, o.warmup_steps, t.num_steps, o.decay_steps)
    return Trainer(model, optimizer, schedule, ctx, micro_batch_size=t.micro_batch_size, grad_clip=o.grad_clip,
                   master_dtype=master_dtype, bucket_mb=t.bucket_mb, zero1=o.zero1, skip_nonfinite=t.nan_policy == "skip")
