"""`bench` of this engine: the core's (core/bench.py, over pretrain.py's EngineParts) plus, with `--op-table`,
after the timed steps (which it leaves alone): torch.profiler over 2 more steps, then, the model freed, each op
timed alone at the run's shapes (op_table.py); the result gets "op_table" and the tables go to stderr."""

from __future__ import annotations

from typing import Callable

import torch
from rich.console import Console

from train_engine_0_5b import op_table as op_table_mod
from train_engine_0_5b.core.cli_guard import err


class OpTable:
    """The core bench's Extra: the per-op table at the bench run's shapes."""

    def profile(self, trainer, step: Callable[[torch.Tensor], None], batch: Callable[[], torch.Tensor]) -> dict:
        device = next(trainer.model.parameters()).device
        batches = iter([batch() for _ in range(2)])
        profile = op_table_mod.profile_steps(lambda: step(next(batches)), device, steps=2)
        return dict(profile=profile, device=device, model_cfg=trainer.model.cfg, ops=trainer.model.ops,
                    dtype=next(trainer.model.parameters()).dtype,
                    param_shapes=[tuple(p.shape) for p in trainer.model.parameters()])

    def finish(self, profiled: dict, result: dict) -> None:
        c = result["config"]
        op_table_mod.free_memory(profiled["device"])
        shapes = dict(micro_batch_size=c["micro_batch_size"], seq_length=c["seq_length"], grad_accum=c["grad_accum"],
                      dtype=profiled["dtype"], param_shapes=profiled["param_shapes"])
        rows = op_table_mod.microbench(profiled["model_cfg"], profiled["ops"], device=profiled["device"], **shapes)
        result["op_table"] = op_table_mod.table(profiled["model_cfg"], rows, profiled["profile"], **shapes)
        # stderr: stdout stays one JSON document; 120 columns unless a terminal says otherwise
        out = err if err.is_terminal else Console(stderr=True, highlight=False, width=120)
        for table in op_table_mod.render(result["op_table"]):
            out.print(table)
