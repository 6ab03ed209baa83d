"""M2 backward: the loss and every parameter's gradient of one step (global token-mean loss).

Case (preset): one step, several micro batches (so gradient accumulation is exercised: the drawn
count for `tiny`, else two), world size 1.
Localization: the first offending parameter in layer order (embedding, layers 0..L-1 in module order,
final norm, head), with the worst one named too.
"""

from __future__ import annotations

from gates.case import hf_param_shapes
from gates.context import GateRun, localize, verdict_of
from gates.report import GateReport


def run(g: GateRun) -> GateReport:
    case = g.make_case(steps=1, grad_accum=g.shape.grad_accum or 2)
    eng, _, _ = g.engine_probe("backward", case)
    g.check("backward", eng, case)
    ref = g.reference_probe("backward", case)
    grads = g.compare_names([f"grad.{n}" for n in hf_param_shapes(case.spec.model)], eng, ref, case)
    loss = g.compare_names(["loss"], eng, ref, case)
    diffs = grads + loss
    if verdict_of(diffs) == "passed":
        return g.finish("passed", f"loss and {len(grads)} parameter gradients within {g.policy.describe()}")
    loc = localize(grads) or localize(loss)
    return g.finish("failed", f"{sum(not d.ok for d in diffs)} of {len(diffs)} tensors out of bounds", loc)
