"""M3 optimizer: N optimizer steps on one rank (AdamW with decoupled weight decay on matrices only,
global-norm clipping, the case's LR schedule): per-step losses, grad norms (before clipping), lrs,
and the final master weights.

Case (preset): `options.steps` steps, one micro batch per step, warmup 2 then WSD decay, so warmup,
the stable phase and the decay are all exercised. One micro batch on one rank is the step the benchmarks
time, where an engine may hand the backward's own (bf16) gradients straight to a fused optimizer; summing
micro batches is checked by M2 (gradients) and M6 (four per step, against the reference's weights).
Localization: the first step whose loss / grad norm / lr diverges, and the first final weight out of
bounds in layer order.
"""

from __future__ import annotations

from gates.case import ScheduleSpec, hf_param_shapes
from gates.context import GateRun, localize_training, verdict_of
from gates.report import GateReport

SERIES = ["losses", "grad_norms", "lrs"]


def run(g: GateRun) -> GateReport:
    case = g.make_case(steps=g.options.steps, grad_accum=1, schedule=ScheduleSpec(kind="wsd", warmup_steps=2))
    eng, _, _ = g.engine_probe("steps", case)
    g.check("steps", eng, case)
    ref = g.reference_probe("steps", case)
    series = g.compare_names(SERIES, eng, ref, case)
    weights = g.compare_names([f"weight.{n}" for n in hf_param_shapes(case.spec.model)], eng, ref, case)
    diffs = series + weights
    if verdict_of(diffs) == "passed":
        return g.finish("passed", f"{case.spec.steps} steps: losses, grad norms, lrs and {len(weights)} final "
                        f"weights within {g.policy.describe()}")
    return g.finish("failed", f"{sum(not d.ok for d in diffs)} of {len(diffs)} compared values out of bounds",
                    localize_training(series, weights))
