"""This engine's ops of one training step for `bench --op-table` (core/op_table.py times each alone at the run's
shapes and profiles the step): the registry ops build.attach_ops handed the model, in the order it calls them.
Its projections, norms and RoPE are plain modules, not registry ops: the profile's kernel categories show them."""

from __future__ import annotations

from train_engine_8b.core.op_table import StepOp


def step_ops(trainer, grad_accum: int) -> list[StepOp]:
    """Per micro batch, each layer's attention and (when a fused MLP runs) its mlp, then the output GEMM + loss
    when `linear_cross_entropy` runs; AdamW once per step."""
    model = trainer.model
    names, layers, L = model.op_record["names"], model.model.layers, model.cfg.num_layers
    out = [StepOp("attention", names["attention"], layers[0].self_attn.attention_op, L * grad_accum)]
    if layers[0].mlp.mlp_op is not None:
        out.append(StepOp("mlp", names["mlp"], layers[0].mlp.mlp_op, L * grad_accum))
    if model.linear_cross_entropy is not None:
        out.append(StepOp("linear_cross_entropy", names["cross_entropy"], model.linear_cross_entropy, grad_accum))
    return out + [StepOp("adamw", names["adamw"], trainer.optimizer.op, 1)]
