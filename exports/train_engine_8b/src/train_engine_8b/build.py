"""One setup path: `build_trainer` turns an EngineConfig into a ready Trainer on a ("dp", "tp") layout of the
world: the model built on meta, parallelized (parallelize.py's steps 1-3), materialized and given its weights
shard by shard, then the core's AdamW (fp32 masters and moments of each rank's local shards), LR schedule and
Trainer, whose reducer sums gradients over the DP group (ZeRO-1: splits each TP shard's optimizer state over
it) and whose gradient norm reduces over the TP group (core/trainer.py, core/optim.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh

from train_engine_8b import AUTO_UNFUSED, registry_ops
from train_engine_8b.config import EngineConfig
from train_engine_8b.core.dist import DistContext
from train_engine_8b.core.errors import EngineError
from train_engine_8b.core.optim import AdamW, Schedule
from train_engine_8b.core.trainer import Trainer
from train_engine_8b.core.weights import Initial, local_masters
from train_engine_8b.minicpm.init import FreshWeights
from train_engine_8b.model import MiniCPM, build_model
from train_engine_8b.ops.cases import Dims
from train_engine_8b.ops.registry import UNFUSED, OpSelection, refuse_unrun, resolve
from train_engine_8b.parallelize import ParallelDims, ParallelError, parallelize_model


@dataclass(frozen=True)
class Layout:
    """Where this process sits: the mesh (None with tp 1: no DTensors), its DP and TP groups as DistContexts."""

    dims: ParallelDims
    mesh: DeviceMesh | None
    dp: DistContext
    tp: DistContext

    @classmethod
    def of(cls, cfg: EngineConfig, ctx: DistContext) -> "Layout":
        """runtime.tp ranks per replica, world / tp replicas; raises EngineError for a layout the model refuses."""
        tp = cfg.runtime.tp
        if ctx.world % tp:
            raise EngineError(f"--tp {tp} does not divide the world size ({ctx.world} ranks)")
        dims = ParallelDims(dp=ctx.world // tp, tp=tp)
        try:
            dims.check(cfg.model, ctx.world)
        except ParallelError as e:
            raise EngineError(str(e)) from None
        alone = DistContext(0, 1, ctx.local_rank, ctx.device)
        if tp == 1:  # no mesh: plain parameters, data parallel over the world
            return cls(dims, None, ctx, alone)
        mesh = dims.build_mesh(ctx.device.type)
        dp = ctx.subgroup(mesh["dp"].get_group()) if dims.dp > 1 else alone
        return cls(dims, mesh, dp, ctx.subgroup(mesh["tp"].get_group()))


def engine_selection(selection: OpSelection, tp: int) -> OpSelection:
    """`selection` as this engine runs it: a fused op it does not run at this TP degree (registry_ops), or one left
    `auto` of AUTO_UNFUSED, is the plain modules (UNFUSED), so the resolved names say what runs."""
    runs = registry_ops(tp)
    plain = [op for op in registry_ops(1)
             if op not in runs or (op in AUTO_UNFUSED and getattr(selection, op) == "auto")]
    return selection.model_copy(update=dict.fromkeys(plain, UNFUSED))


def attach_ops(model: MiniCPM, ops, *, tp: bool) -> dict[str, str]:
    """Hand `model` the registry ops it runs (`ops`, resolved from engine_selection); returns what runs, by op.
    Attention and AdamW always; the output GEMM + loss as `linear_cross_entropy` and the MLP as `mlp` where they
    are not UNFUSED (without TP only); under TP the vocab-parallel cross-entropy and the parallel projections."""
    for layer in model.model.layers:
        layer.self_attn.attention_op = ops.attention
        layer.mlp.mlp_op = ops.mlp
    model.linear_cross_entropy = ops.linear_cross_entropy
    ce = "vocab_parallel" if tp else "torch" if ops.linear_cross_entropy is None else ops.names["linear_cross_entropy"]
    return {"attention": ops.names["attention"], "adamw": ops.names["adamw"], "cross_entropy": ce,
            "mlp": ops.names["mlp"]}


def build_trainer(cfg: EngineConfig, ctx: DistContext, initial: Initial | None = None, *,
                  dtype: torch.dtype, master_dtype: torch.dtype = torch.float32, layout: Layout | None = None) -> Trainer:
    """The Trainer of `cfg`'s run on `ctx` (every rank calls it), its model in `dtype`.

    `initial`: whole master weights by HF name (a probe case's), each rank keeping its shards, or --init-from's
    lazy reader (core/weights.py), of which each rank reads only its shards; None: fresh weights from
    train.init_std and train.seed (minicpm/init.py's FreshWeights), of which each rank draws only its shards,
    equal to its shards of the whole init. A checkpoint is restored afterwards (core/checkpoint.restore), on
    whatever layout wrote it."""
    t, o, r = cfg.train, cfg.optim, cfg.runtime
    layout = layout or Layout.of(cfg, ctx)
    tp = layout.dims.tp  # before any memory is spent on the model: an op it would not run is an error
    refuse_unrun(cfg.ops, registry_ops(tp), "train_engine_8b" + (f" at --tp {tp}" if tp > 1 else ""))
    try:
        model = parallelize_model(build_model(cfg.model), layout.mesh, r.recompute, r.resolved_compile(),
                                  r.async_tp)
    except ParallelError as e:
        raise EngineError(str(e)) from None
    model = model.to_empty(device=ctx.device).to(dtype)
    params = dict(model.named_parameters())  # from a WeightSource each rank reads (or draws) only what it holds
    source = initial if initial is not None else FreshWeights(cfg.model, t.init_std, t.seed)
    ops = resolve(engine_selection(cfg.ops, tp), ctx.device.type, dtype,
                  dims=Dims.of_model(cfg.model, t.micro_batch_size, t.seq_length))
    model.op_record = {"names": attach_ops(model, ops, tp=layout.mesh is not None)}  # logs, checkpoints
    # the local masters unnamed: freed once AdamW has copied them, before the Trainer allocates its buffers
    optimizer = AdamW(params, local_masters(source, params), adamw_op=ops.adamw, betas=o.betas, eps=o.eps,
                      weight_decay=o.weight_decay, master_dtype=master_dtype)
    schedule = Schedule(o.lr_schedule, o.lr, o.min_lr, o.warmup_steps, t.num_steps, o.decay_steps)
    return Trainer(model, optimizer, schedule, ctx, micro_batch_size=t.micro_batch_size, grad_clip=o.grad_clip,
                   master_dtype=master_dtype, bucket_mb=t.bucket_mb, zero1=o.zero1,
                   skip_nonfinite=t.nan_policy == "skip", dp=layout.dp, tp=layout.tp)
