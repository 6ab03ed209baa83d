"""This engine's ops of one training step for `bench --op-table` (core/op_table.py times them and profiles the
step): which registry op the model calls, how often, in the order model.py calls them."""

from __future__ import annotations

from train_engine_0_5b.core.op_table import StepOp


def calls_per_step(num_layers: int, grad_accum: int, fused_mlp: bool = False,
                   fused_output: bool = False, fused_qkv: bool = False) -> dict[str, int]:  # fmt: skip
    """Calls of each op per optimizer step, in the order the model calls them (model.py): per micro
    batch one rms_norm, per layer the qkv GEMM and rope (or, fused, one qkv_rope), attention, attn_out
    GEMM, add_rms_norm, fc1 GEMM, swiglu, fc2 GEMM (or, fused, one mlp), add_rms_norm, then the output GEMM
    and cross_entropy (or, fused, one linear_cross_entropy); AdamW once per step."""
    L = num_layers
    qkv = {"qkv_rope": L} if fused_qkv else {"gemm.qkv": L, "rope": L}
    mlp = {"mlp": L} if fused_mlp else {"gemm.fc1": L, "swiglu": L, "gemm.fc2": L}
    output = {"linear_cross_entropy": 1} if fused_output else {"gemm.output": 1, "cross_entropy": 1}
    per_micro_batch = {"rms_norm": 1, **qkv, "attention": L, "gemm.attn_out": L,
                       "add_rms_norm": 2 * L, **mlp, **output}  # fmt: skip
    return {op: n * grad_accum for op, n in per_micro_batch.items()} | {"adamw": 1}


def step_ops(trainer, grad_accum: int) -> list[StepOp]:
    """The model's ops (`trainer.model.ops`, what the run selected), fused ones in place of their parts."""
    return ops_of_step(trainer.model.ops, trainer.model.cfg.num_layers, grad_accum)


def ops_of_step(ops, num_layers: int, grad_accum: int) -> list[StepOp]:
    """StepOps of resolved `ops` (registry.Ops) for a model of `num_layers` layers."""
    fused = dict(fused_mlp=ops.mlp is not None, fused_output=ops.linear_cross_entropy is not None,
                 fused_qkv=ops.qkv_rope is not None)
    return [StepOp(op, ops.names[op], getattr(ops, op.replace(".", "_")), calls)
            for op, calls in calls_per_step(num_layers, grad_accum, **fused).items()]
