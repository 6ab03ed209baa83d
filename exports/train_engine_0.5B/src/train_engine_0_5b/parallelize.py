"""How the model runs in parallel and fast, applied in one documented order (torchtitan's parallelize order):

1. tensor parallelism: none here (one whole replica per rank: 0.5B fits). It would come first, because
   every later step wraps, compiles or hooks the modules it shards.
2. activation recomputation (runtime.recompute): the named part of every layer keeps only its inputs for
   backward (model.py's boundaries: mlp, attention, layer).
3. torch.compile (runtime.compile): the training path (`loss_sum`), after recomputation so that the
   compiled graph holds its checkpoints.
4. data parallelism (core/dist.py's GradReducer: bucketed all-reduce, or ZeRO-1's reduce-scatter and
   all-gather): it hooks every parameter's gradient and, for ZeRO-1, shards the optimizer, so the Trainer
   builds it around the model this module returns (build.py).
5. CUDA graph (runtime.cuda_graph): the whole step captured and replayed (core/cuda_graph.py), last,
   because it records what 1-4 launch.

`parallelize_model` applies 1-3 to a built model; the core's `cuda_graph.step_function` applies 5 to the built
Trainer (the same in every engine).
"""

from __future__ import annotations

import torch

from train_engine_0_5b.core.config import Recompute, RuntimeConfig
from train_engine_0_5b.model import RECOMPUTE, MiniCPM


def parallelize_model(model: MiniCPM, runtime: RuntimeConfig) -> MiniCPM:
    """Steps 1-3 on `model`, in place; returns it."""
    apply_recompute(model, runtime.recompute)
    if runtime.resolved_compile():
        apply_compile(model)
    return model


def apply_recompute(model: MiniCPM, recompute: Recompute) -> None:
    """2. Which part of every layer recomputes its activations in backward (RECOMPUTE)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r}: choose one of {', '.join(RECOMPUTE)}")
    model.recompute = recompute


def apply_compile(model: MiniCPM) -> None:
    """3. torch.compile the training path (embedding -> layers -> output GEMM -> summed CE) in place.
    Probes and `forward(hidden_states=...)` stay eager; only `loss_sum`, what the trainer calls, is compiled.
    Whole-graph fusion of the reference ops is what makes this the fast GPU path (see README, bench)."""
    model.loss_sum = torch.compile(model.loss_sum)  # instance attribute shadows the method
