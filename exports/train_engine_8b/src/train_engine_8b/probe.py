"""The probe contract, answered by this engine at any tensor-parallel degree: the shared case and probes
(core/probe.py) with this engine's model part: build.py's Trainer on the ("dp", "tp") layout and the model's
forward with the residual stream, gathered whole (the vocab-sharded logits, the sequence-sharded stream).

    [torchrun --nproc-per-node N] -m train_engine_8b probe forward|backward|steps|checkpoint --case DIR --out DIR [--tp T]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from train_engine_8b import registry_ops
from train_engine_8b.build import Layout, build_trainer, engine_selection
from train_engine_8b.core import probe as core_probe
from train_engine_8b.core.dist import DistContext
from train_engine_8b.core.probe import Case
from train_engine_8b.ops.registry import OpSelection

STACK = "train_engine_8b"


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _forward(case: Case, ctx: DistContext, ops, tp: int) -> dict[str, torch.Tensor]:
    cfg = case.engine_config(tp).model_copy(update={"ops": ops.selection})
    layout = Layout.of(cfg, ctx)
    master = {k: v.to(case.master_dtype) for k, v in case.weights.items()}
    model = build_trainer(cfg, ctx, master, dtype=case.compute_dtype, master_dtype=case.master_dtype,
                          layout=layout).model
    dp = layout.dp
    ids, labels = case.local_batch(0, dp)
    hidden: list[torch.Tensor] = []
    with torch.no_grad():
        logits = _whole(model(ids, hidden_states=hidden))
        total = model.loss_sum(ids, labels).to(logits.dtype)
    if layout.tp.world > 1:  # the residual stream is sequence-parallel: each TP rank holds (B, S / tp, h)
        hidden = [torch.cat(layout.tp.all_gather(h.contiguous()), dim=1) for h in hidden]
    return core_probe.forward_answer(dp, logits, total, labels, hidden)


PARTS = core_probe.ProbeParts(
    stack=STACK, forward=_forward, selection=engine_selection, registry_ops=registry_ops,
    build_trainer=lambda cfg, ctx, ops, master, dtype, master_dtype: build_trainer(
        cfg.model_copy(update={"ops": ops.selection}), ctx, master, dtype=dtype, master_dtype=master_dtype))


def run_probe(name: str, case_dir: Path, out: Path, ops_selection: OpSelection = OpSelection(), tp: int = 1) -> Path:
    """Answer one probe; returns the output directory. Raises Unsupported (exit 77) or EngineError."""
    return core_probe.run_probe(name, case_dir, out, PARTS, ops_selection, tp)
