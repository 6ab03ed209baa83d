"""M3 optimizer: N optimizer steps on one rank (AdamW with decoupled weight decay on matrices only,
global-norm clipping, the case's LR schedule): per-step losses, grad norms (before clipping), lrs,
and the final master weights.

Case (preset): `options.steps` steps, one micro batch per step, warmup 2 then WSD decay, so warmup,
the stable phase and the decay are all exercised (a drawn `tiny` shape gives the decay length, capped so
one stable step remains). One micro batch on one rank is the step the benchmarks
time, where an engine may hand the backward's own (bf16) gradients straight to a fused optimizer; summing
micro batches is checked by M2 (gradients) and M4 (2-3 per rank and step on tiny cases, against the reference's
final weights).
In bf16 the peak LR is 1e-4, not the case default 1e-3: at 1e-3 Adam's first, sign-like updates move
MiniCPM4-0.5B so far that by step 4 the grad norm is chaotic. On an H100 (benchmarks/results/gates/
2026-11-23-h100-m3-lr/) the torch reference gave 0.219 twice, bit for bit, while five correct engine
op selections gave 0.28 to 3.2, all with step losses within 1e-5; such a step compares noise, not the optimizer.
Final weights: the policy's bounds, with the AdamW step cap on the max criterion (policies.py says why).
Localization: the first step whose loss / grad norm / lr diverges, and the first final weight out of
bounds in layer order.
"""

from __future__ import annotations

from gates.case import CaseShape, OptimizerSpec, ScheduleSpec, hf_param_shapes
from gates.context import GateRun, localize_training, verdict_of
from gates.policies import adamw_step_cap
from gates.report import GateReport

SERIES = ["losses", "grad_norms", "lrs"]
LOW_PRECISION_LR = 1e-4  # peak LR for bf16 cases (see above); fp32 / fp64 cases keep the default
WARMUP = 2


def schedule(shape: CaseShape, steps: int) -> ScheduleSpec:
    """WSD with warmup 2; a drawn decay length is capped so that one stable step remains."""
    decay = None if shape.decay_steps is None else max(1, min(shape.decay_steps, steps - WARMUP - 1))
    return ScheduleSpec(kind="wsd", warmup_steps=WARMUP, decay_steps=decay)


def run(g: GateRun) -> GateReport:
    low = g.options.case_dtype not in ("float32", "float64")
    optimizer = OptimizerSpec(lr=LOW_PRECISION_LR, min_lr=LOW_PRECISION_LR / 10) if low else OptimizerSpec()
    steps = g.options.steps
    case = g.make_case(steps=steps, grad_accum=1, schedule=schedule(g.shape, steps), optimizer=optimizer)
    eng, _, _ = g.engine_probe("steps", case)
    g.check("steps", eng, case)
    ref = g.reference_probe("steps", case)
    series = g.compare_names(SERIES, eng, ref, case)
    weights = g.compare_names([f"weight.{n}" for n in hf_param_shapes(case.spec.model)], eng, ref, case,
                              step_cap=adamw_step_cap(ref["lrs"], g.policy))
    diffs = series + weights
    if verdict_of(diffs) == "passed":
        return g.finish("passed", f"{case.spec.steps} steps: losses, grad norms, lrs and {len(weights)} final "
                        f"weights within {g.policy.describe()}")
    return g.finish("failed", f"{sum(not d.ok for d in diffs)} of {len(diffs)} compared values out of bounds",
                    localize_training(series, weights))
