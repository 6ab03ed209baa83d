"""The probe contract, answered by this engine: the shared case and probes (core/probe.py) with this engine's
model part: build.py's Trainer and its model's forward with the residual stream (the contract's hidden_states).

    probe forward|backward|steps|checkpoint --case DIR --out DIR   ->  DIR/tensors.safetensors, DIR/metrics.json
"""

from __future__ import annotations

from pathlib import Path

import torch

from train_engine_0_5b.build import build_trainer
from train_engine_0_5b.core import probe as core_probe
from train_engine_0_5b.core.dist import DistContext
from train_engine_0_5b.core.probe import CASE_FORMAT, PROBES, Case, CaseSpec
from train_engine_0_5b.model import build_model, load_weights
from train_engine_0_5b.ops.registry import OpSelection, Ops

__all__ = ["CASE_FORMAT", "PROBES", "Case", "CaseSpec", "PARTS", "STACK", "run_probe"]
STACK = "train_engine_0_5b"


def _forward(case: Case, ctx: DistContext, ops: Ops, tp: int) -> dict[str, torch.Tensor]:
    model = build_model(case.spec.model, ops, ctx.device, case.compute_dtype)
    load_weights(model, case.weights)
    ids, labels = case.local_batch(0, ctx)
    hidden: list[torch.Tensor] = []
    with torch.no_grad():
        logits = model(ids, hidden_states=hidden)
        total = ops.cross_entropy(logits, labels)
    return core_probe.forward_answer(ctx, logits, total, labels, hidden)


PARTS = core_probe.ProbeParts(
    stack=STACK, forward=_forward,
    build_trainer=lambda cfg, ctx, ops, master, dtype, master_dtype: build_trainer(
        cfg, ctx, ops, master, dtype=dtype, master_dtype=master_dtype))


def run_probe(name: str, case_dir: Path, out: Path, ops_selection: OpSelection = OpSelection()) -> Path:
    """Answer one probe; returns the output directory. Raises Unsupported (exit 77) or EngineError."""
    return core_probe.run_probe(name, case_dir, out, PARTS, ops_selection)
