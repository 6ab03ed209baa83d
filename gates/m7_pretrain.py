"""M7 pretrain: the engine's own `pretrain`, run as a user runs it (its defaults plus the spec's production
flags, gates/train_contract.py), against the reference on the same weights and batches.

Case (preset): DP world size N, two micro batches per rank per step, `options.steps` steps, a gradient
bucket size small enough that the gradients span several buckets.

Parts:
- `dp1`: `pretrain` in one process (N x 2 micro batches per step); the JSONL log's per-step loss, grad
  norm (before clipping) and lr against the reference's `steps` probe, under the policy; each step's
  `valid_tokens` must be its batch's; then `dump-state` of the final checkpoint: every master weight
  against the reference's final weights (the AdamW step cap of policies.py on the max criterion).
- `dpN`: the same under torchrun with N processes (gloo on a CPU, NCCL on GPUs). On cuda with fewer
  than N GPUs this part is `unsupported` (the gate's own limit), and the report says so.
- `hf_export`: `export-hf` of the DP=1 run's final checkpoint, loaded by `transformers` without remote
  code; its residual stream and logits on step 0's batch against the reference's forward at the engine's
  own final weights (that checkpoint's `dump-state`, which `dp1` holds to the reference's final weights).
  So the part sees the export alone (its fold of the MiniCPM scales, its names and layout), as M6's does,
  not how two trainings drift apart: an embedding element that AdamW moved by a different share of a step
  (g / (|g| + eps) on a near-zero gradient, within `dp1`'s AdamW step cap) is scaled by scale_emb in
  hidden_states.0 and showed there above the 1e-4 max_rel bound against the reference's weights
  (train_engine_8b at TP=2, 1 of 5 seeds: 4.7e-4). An export that copies the reference's weights, or
  anything but the checkpoint `dump-state` read, differs from those weights by what `dp1` measured.
Verdict: the worst part. Localization: the first diverging step (or weight) of the first failing part.
"""

from __future__ import annotations

import torch

from gates.case import OptimizerSpec, hf_param_shapes
from gates.context import GateRun, GateStop, localize, localize_training, part
from gates.m3_optimizer import LOW_PRECISION_LR
from gates.m6_checkpoint import load_hf
from gates.policies import adamw_step_cap
from gates.pretrain_runs import PretrainBox, data_position, metrics_line
from gates.report import GateReport, Localization, Part, worst

SERIES = ["losses", "grad_norms", "lrs"]


def bucket_mb(g: GateRun) -> float:
    """The run's all-reduce bucket size: drawn for tiny cases (0.01-0.05 MiB, so the gradients span dozens
    of buckets), torch DDP's usual 25 MiB otherwise (gates/case.py CaseShape.bucket_mb)."""
    return g.shape.bucket_mb


def run(g: GateRun) -> GateReport:
    o = g.options
    low = o.case_dtype not in ("float32", "float64")  # bf16: M3's peak LR, for the reason m3_optimizer.py gives
    optimizer = OptimizerSpec(lr=LOW_PRECISION_LR, min_lr=LOW_PRECISION_LR / 10) if low else OptimizerSpec()
    case = g.make_case(world_size=o.world_size, steps=max(o.steps, 4), grad_accum=2, optimizer=optimizer)
    spec = case.spec
    n = spec.world_size
    box = PretrainBox(g, case)
    # Every engine command runs before the reference: no reference output exists anywhere while they run.
    runs = {"dp1": engine_run(g, box, "dp1", 1)}
    if spec.device == "cuda" and torch.cuda.device_count() < n:
        runs["dpN"] = Part(name="dpN", verdict="unsupported", message=f"DP={n} on cuda needs {n} GPUs; this machine "
                           f"has {torch.cuda.device_count()} (the gate's limit, not the engine's)")
    else:
        runs["dpN"] = engine_run(g, box, "dpN", n)
    hf = engine_export(g, box) if isinstance(runs["dp1"], tuple) else None
    ref = g.reference_probe("steps", case)

    parts: list[Part] = []
    locs: list[Localization | None] = []
    for name, got in runs.items():
        p, loc = compare_run(g, box, ref, name, got) if isinstance(got, tuple) else (got, _loc(got))
        parts.append(p)
        locs.append(loc)
    p, loc = export_part(g, box, runs["dp1"], hf) if not isinstance(hf, Part) else (hf, _loc(hf))
    parts.append(p)
    locs.append(loc)

    g.report.parts = parts
    verdict = worst([p.verdict for p in parts])
    g.report.artifacts["engine log (last line, its own figures)"] = metrics_line(box.log("dp1"))
    if verdict == "passed":
        return g.finish("passed", f"pretrain at DP=1 and DP={n} ({spec.steps} steps, {spec.grad_accum} micro batches "
                        f"per rank at DP={n}) and its HF export match the reference within {g.policy.describe()}")
    first = next((l for p, l in zip(parts, locs) if p.verdict == "failed" and l is not None), None)
    return g.finish(verdict, "; ".join(f"{p.name}: {p.verdict}" for p in parts), first)


def _loc(p: Part) -> Localization | None:
    return Localization(what=f"{p.name}: {p.message}") if p.verdict == "failed" else None


def _stopped(name: str, stop: GateStop) -> Part:
    """An engine command that declined or broke the contract fails the part; a crash or timeout is `error`."""
    verdict = "failed" if stop.verdict in ("failed", "unsupported") else stop.verdict
    return Part(name=name, verdict=verdict, message=stop.message)


def engine_run(g: GateRun, box: PretrainBox, name: str, nproc: int):
    """Run pretrain in `nproc` processes, then dump-state: (log series, state) or a Part saying why not."""
    spec = box.case.spec
    role = f"engine pretrain DP={nproc}"
    try:
        box.run(name, role, nproc, g.options.pretrain_args, bucket_mb(g))
        log = box.series(name, 1, spec.steps, role)
        state, _ = box.state(name, f"engine dump-state DP={nproc}")
    except GateStop as stop:
        return _stopped(name, stop)
    return log, state, nproc


def compare_run(g: GateRun, box: PretrainBox, ref: dict[str, torch.Tensor], name: str,
                got: tuple) -> tuple[Part, Localization | None]:
    """A run's log and final state against the reference's steps probe."""
    log, state, nproc = got
    case, spec = box.case, box.case.spec
    where = data_position(log["valid_tokens"], case, 1)
    if where is not None:
        return Part(name=name, verdict="failed", message=where), Localization(what=f"DP={nproc}: {where}")
    weights = [f"weight.{k}" for k in hf_param_shapes(spec.model)]
    missing = [w for w in weights if w not in state]
    if missing:
        what = f"dump-state has no {missing[0]} ({len(missing)} of {len(weights)} weights missing)"
        return Part(name=name, verdict="failed", message=what), Localization(what=f"DP={nproc}: {what}")
    prefix = f"{name}:"
    s = g.compare_names(SERIES, log, ref, case, prefix=prefix)
    w = g.compare_names(weights, state, ref, case, prefix=prefix, step_cap=adamw_step_cap(ref["lrs"]))
    p = part(name, s + w)
    p.message = f"pretrain DP={nproc}, {spec.steps} steps: " + p.message
    return p, localize_training(s, w, f"pretrain DP={nproc} vs reference: ")


def engine_export(g: GateRun, box: PretrainBox):
    """export-hf of the DP=1 run's newest checkpoint: its directory, or a Part saying why not."""
    if not box.save_dir("dp1").exists():
        return Part(name="hf_export", verdict="failed", message="the DP=1 pretrain left no checkpoint in --save-dir")
    try:
        return box.export_hf("dp1", "engine export-hf")
    except GateStop as stop:
        return _stopped("hf_export", stop)


def export_part(g: GateRun, box: PretrainBox, dp1, hf_dir) -> tuple[Part, Localization | None]:
    """The export of the DP=1 run's final checkpoint vs the reference's forward at that checkpoint's weights
    (`dp1`: engine_run's (log, dump-state, nproc)), under the policy as M6's part."""
    case, spec = box.case, box.case.spec
    if hf_dir is None:
        return Part(name="hf_export", verdict="failed", message="not run: the DP=1 pretrain failed"), None
    model, problem = load_hf(hf_dir, spec)
    if problem:
        return Part(name="hf_export", verdict="failed", message=problem), Localization(what=f"HF export: {problem}")
    state = dp1[1]
    bad = [k for k, w in case.weights.items() if f"weight.{k}" not in state or tuple(state[f"weight.{k}"].shape) !=
           tuple(w.shape) or not bool(torch.isfinite(state[f"weight.{k}"]).all())]
    if bad:
        what = f"not compared: dump-state's {bad[0]} is missing, misshapen or not finite ({len(bad)} weights)"
        return Part(name="hf_export", verdict="failed", message=what), Localization(what=f"HF export: {what}")
    trained = {k: state[f"weight.{k}"] for k in case.weights}
    fwd = g.write_case(spec.model_copy(update={"steps": 1}), {k: t[:1] for k, t in case.batches.items()}, trained,
                       label=f"forward at the engine's weights after {spec.steps} steps (dump-state of dp1)")
    ref_fwd = g.reference_probe("forward", fwd)
    ids = fwd.global_batch(0)[0].to(spec.device)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    L = spec.model.num_layers
    got = {f"hidden_states.{i}": out.hidden_states[i].float().cpu() for i in range(L)}
    got["logits"] = out.logits.float().cpu()
    diffs = g.compare_names(list(got), got, ref_fwd, fwd, prefix="hf_export:")
    p = part("hf_export", diffs)
    p.message = f"transformers {type(model).__name__}, final weights: " + p.message
    return p, localize(diffs, "HF export of pretrain's final checkpoint vs reference forward at its weights: ")
