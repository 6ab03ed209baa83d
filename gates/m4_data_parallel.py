"""M4 data parallel: the engine at DP=N (torchrun) equals itself at DP=1 on the same global batch, and
the reference, over several optimizer steps.

Launch: `torchrun --standalone --nproc-per-node N -m <pkg> probe steps ...` (gloo on CPU, NCCL on GPU:
the engine picks the backend from the case's device). N: the `world_size` option, else the run's shape
(drawn 2..4 for `tiny`, else 2); a drawn `tiny` shape also gives the micro batches per rank and step
(2..3: accumulation under DP) and the LR schedule (any kind). The DP=1 case holds the same weights and
the same global batch per step: world size 1, N x the micro batches, rows in rank order.

Parts: `vs_dp1` (engine DP=N against engine DP=1), `vs_reference` (engine DP=N against the
reference), and `ranks`: every process's own outputs (gates/probe.py, per-rank outputs) exist, count
exactly its rows' valid tokens, and hold its rows' loss sums against the reference's per-rank sums (a
rank that idles while another computes its rows passes the first two parts, not this one). All under
the policy (comparative bf16 rule: `vs_dp1`'s bounds come from the reference's
own bf16 error, as `vs_reference`'s do). The verdict is the worse of the two. Localization comes from
`vs_dp1` when it fails (a DP bug shows there first: wrong loss averaging, a missing all-reduce),
else from `vs_reference`: the first diverging step and the first final weight out of bounds. A rank
is named when one rank crashes (torchrun's failure summary).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from gates.case import Case, ScheduleSpec, hf_param_shapes
from gates.context import GateRun, GateStop, localize_training, part
from gates.policies import adamw_step_cap
from gates.probe import REFERENCE_RANK_SUMS, rank_file
from gates.report import GateReport, Localization, Part, worst

SERIES = ["losses", "grad_norms", "lrs"]


def run(g: GateRun) -> GateReport:
    shape = g.shape
    case = g.make_case(world_size=shape.world_size, steps=g.options.steps, grad_accum=shape.grad_accum or 1,
                       schedule=shape.schedule or ScheduleSpec())
    spec = case.spec
    n = spec.world_size
    if n < 2:
        raise GateStop("unsupported", f"gate limit: the case has world size {n}; M4 needs a case with world size >= 2")
    if spec.device == "cuda" and torch.cuda.device_count() < n:
        raise GateStop("unsupported", f"gate limit: DP={n} on cuda needs {n} GPUs; this machine has {torch.cuda.device_count()}")
    batches = {k: v.reshape(spec.steps, 1, n * spec.rows_per_rank, spec.seq_length) for k, v in case.batches.items()}
    dp1_spec = spec.model_copy(update={"world_size": 1, "grad_accum": n * spec.grad_accum})
    dp1 = g.write_case(dp1_spec, batches=batches, weights=case.weights, label="dp1 (same global batch)")

    eng_n, _, box = g.engine_probe("steps", case, nproc=n, role=f"engine probe steps DP={n}", keep=True)
    try:
        ranks = read_ranks(box.out, case)
    finally:
        if not g.options.keep_workdirs:
            box.remove()
    g.check("steps", eng_n, case)
    eng_1, _, _ = g.engine_probe("steps", dp1, role="engine probe steps DP=1")
    g.check("steps", eng_1, dp1)
    ref = g.reference_probe("steps", case)

    weights = [f"weight.{k}" for k in hf_param_shapes(spec.model)]
    cap = adamw_step_cap(ref["lrs"], g.policy)  # final weights: policies.py says why
    s1 = g.compare_names(SERIES, eng_n, eng_1, case, prefix="vs_dp1:", scale=ref)
    w1 = g.compare_names(weights, eng_n, eng_1, case, prefix="vs_dp1:", step_cap=cap, scale=ref)
    sr = g.compare_names(SERIES, eng_n, ref, case, prefix="vs_reference:")
    wr = g.compare_names(weights, eng_n, ref, case, prefix="vs_reference:", step_cap=cap)
    parts = [part("vs_dp1", s1 + w1), part("vs_reference", sr + wr), ranks_part(g, ranks, ref, case)]
    g.report.parts = parts
    verdict = worst([p.verdict for p in parts])
    if verdict == "passed":
        return g.finish("passed", f"DP={n} over {spec.steps} steps equals DP=1 and the reference within {g.policy.describe()}")
    loc = (localize_training(s1, w1, f"DP={n} vs DP=1: ") or localize_training(sr, wr, f"DP={n} vs reference: ")
           or g.report.localization)
    return g.finish(verdict, f"DP={n} diverges ({', '.join(p.name for p in parts if p.verdict != 'passed')})", loc)


def read_ranks(out: Path, case: Case) -> dict[str, torch.Tensor] | Localization:
    """Every process's per-rank file as {"rank_loss_sums", "rank_valid_tokens"} of shape (steps, N), or
    where the first one is missing or malformed."""
    n, steps = case.spec.world_size, case.spec.steps
    sums, counts = [], []
    for r in range(n):
        path = rank_file(out, r)
        if not path.is_file():
            return Localization(what=f"rank {r} wrote no {path.relative_to(out)} (every rank answers for its rows)", rank=r)
        try:
            t = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - an unreadable file is the engine's fault
            return Localization(what=f"rank {r}: unreadable {path.name}: {e}", rank=r)
        for name, dtype in (("loss_sums", torch.float64), ("valid_tokens", torch.int64)):
            if name not in t or tuple(t[name].shape) != (steps,) or t[name].dtype != dtype:
                got = (tuple(t[name].shape), t[name].dtype) if name in t else "missing"
                return Localization(what=f"rank {r}: {name} must be ({steps},) {dtype}; got {got}", rank=r, tensor=name)
        sums.append(t["loss_sums"])
        counts.append(t["valid_tokens"])
    return {REFERENCE_RANK_SUMS: torch.stack(sums, 1), "rank_valid_tokens": torch.stack(counts, 1)}


def ranks_part(g: GateRun, ranks: dict[str, torch.Tensor] | Localization, ref: dict[str, torch.Tensor], case: Case) -> Part:
    """Part `ranks`: files from every rank, exact token counts of each rank's rows, loss sums in bounds."""
    if isinstance(ranks, Localization):
        g.report.localization = g.report.localization or ranks
        return Part(name="ranks", verdict="failed", message=ranks.what)
    want = (case.batches["labels"] != -100).sum(dim=(2, 3))  # (steps, world): each rank's valid labels
    bad = (ranks["rank_valid_tokens"] != want).nonzero()
    if len(bad):
        t, r = (int(x) for x in bad[0])
        what = (f"rank {r} step {t}: reports {int(ranks['rank_valid_tokens'][t, r])} valid tokens; its rows have "
                f"{int(want[t, r])}")
        g.report.localization = g.report.localization or Localization(what=what, rank=r, step=t, tensor="valid_tokens")
        return Part(name="ranks", verdict="failed", message=what)
    diffs = g.compare_names([REFERENCE_RANK_SUMS], ranks, ref, case, prefix="ranks:")
    return part("ranks", diffs)
