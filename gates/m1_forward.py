"""M1 forward: logits, loss and every layer's residual stream (`hidden_states.0..L`) on one global batch.

Case (preset): one step, one micro batch of the run's shape (drawn from the seed for `tiny`), world
size 1. The engine's `forward` probe is
checked against the contract (names, shapes, finite, no input copies), then compared with the
reference's under the policy. Localization: the first layer whose output exceeds the bound
(`hidden_states.0` is the embedding output, `hidden_states.i` layer i-1's); if every layer is within
bounds but the logits or loss are not, the final norm / output head. The line also names the layer
where the relative error grows most (under a loose bf16 bound the first layer over it can lie
downstream of the one that went wrong).
"""

from __future__ import annotations

from gates.context import GateRun, localize, verdict_of
from gates.policies import Diff
from gates.report import GateReport


def run(g: GateRun) -> GateReport:
    case = g.make_case(steps=1)
    eng, _, _ = g.engine_probe("forward", case)
    g.check("forward", eng, case)
    ref = g.reference_probe("forward", case)
    L = case.spec.model.num_layers
    hidden = g.compare_names([f"hidden_states.{i}" for i in range(L + 1)], eng, ref, case)
    head = g.compare_names(["logits", "loss"], eng, ref, case)
    diffs = hidden + head
    verdict = verdict_of(diffs)
    if verdict == "passed":
        return g.finish("passed", f"logits, loss and {L + 1} hidden states within {g.policy.describe()}")
    loc = localize(hidden) or localize(head, "every layer within bounds; final norm / output head: ")
    if loc is not None:
        loc.what += growth_hint(hidden)
    return g.finish("failed", f"{sum(not d.ok for d in diffs)} of {len(diffs)} forward tensors out of bounds", loc)


def growth_hint(hidden: list[Diff]) -> str:
    """Where the relative error grows most from one layer to the next: under a loose (bf16) bound the
    first layer over it can lie downstream of the layer that went wrong."""
    rels = [d.rel if d.rel == d.rel else float("inf") for d in hidden]
    if len(rels) < 2:
        return ""
    jumps = [(rels[i] - rels[i - 1], i - 1) for i in range(1, len(rels))]
    jump, layer = max(jumps)
    return f" | largest growth of rel at layer {layer} (+{jump:.3e})"
