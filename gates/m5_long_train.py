"""M5 long train: K steps of real training (default corpus, default tokenizer), loss curve against the
reference, plus MFU on GPU.

Parts and their rules:
- `loss`: engine and reference run the `steps` probe on the same case: fresh random weights (seeded),
  batches packed from the shipped default corpus (gates/case_data.py), K = `long_train_steps`,
  lr 1e-2 with warmup then WSD decay so the curve actually falls. With l_e(t), l_r(t) the per-step
  losses, d(t) = |l_e(t) - l_r(t)| / |l_r(t)|; the statistic is the mean of d(t) over the trailing
  window of W = min(`long_train_window`, K) steps. `passed` iff that mean < `long_train_threshold`
  (1 %) and every loss is finite. The report also gives max d(t) and the first step where d(t) exceeds
  the threshold (the localization).
- `mfu`: GPU only. The engine's `bench --seq-length S --micro-batch-size M --steps N --json F` runs on
  one GPU; the gate recomputes MFU from its `tokens_per_s` with DESIGN.md's formula
  (`flops_per_token` of the engine's model_spec.toml [model], else the case's model; peak 989.4
  TFLOP/s) and requires >= `mfu_threshold`. The engine's own `mfu` claim is recorded beside it. On CPU
  this part is `unsupported`: MFU against an H100 peak means nothing there.

Overall verdict: the worse of the two parts (failed > error > unsupported > passed). So on CPU a
correct engine gets `unsupported` with `loss: passed` in the report, never a silent `passed`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from gates.case import OptimizerSpec, ScheduleSpec, make_spec
from gates.case_data import corpus_batches
from gates.context import GateRun, GateStop
from gates.model_config import ConfigError, MiniCPMConfig, from_toml
from gates.policies import Diff
from gates.report import GateReport, Localization, Part, worst

PEAK_FLOPS = 989.4e12  # dense bf16 per H100 / H200 SXM GPU (DESIGN.md)


def run(g: GateRun) -> GateReport:
    o = g.options
    if g.is_preset():
        k = o.long_train_steps
        spec = make_spec(o.case, steps=k, world_size=1, micro_batch_size=o.micro_batch_size, seq_length=o.seq_length,
                         dtype=o.case_dtype, device=o.device, seed=o.seed or 0,
                         optimizer=OptimizerSpec(lr=1e-2, min_lr=1e-3),
                         schedule=ScheduleSpec(kind="wsd", warmup_steps=max(1, k // 10), decay_steps=max(1, k // 5)))
        case = g.write_case(spec, batches=corpus_batches(spec, spec.seed), label="case (default corpus)")
    else:
        case = g.make_case()
    eng, _, _ = g.engine_probe("steps", case)
    g.check("steps", eng, case)
    ref = g.reference_probe("steps", case)
    loss_part, loc = loss_curve(g, eng["losses"], ref["losses"])
    parts = [loss_part, mfu_part(g, case.spec.model)]
    g.report.parts = parts
    verdict = worst([p.verdict for p in parts])
    if verdict == "passed":
        return g.finish("passed", "loss curve and MFU within bounds")
    summary = "; ".join(f"{p.name}: {p.verdict}" for p in parts)
    if verdict == "unsupported":
        summary += " -> not passed: the MFU part could not be measured here"
    return g.finish(verdict, summary, loc)


def loss_curve(g: GateRun, eng: torch.Tensor, ref: torch.Tensor) -> tuple[Part, Localization | None]:
    o = g.options
    e, r = eng.double(), ref.double()
    d = (e - r).abs() / r.abs()
    k = d.numel()
    w = min(o.long_train_window, k)
    stat = float(d[-w:].mean())
    over = [t for t in range(k) if float(d[t]) > o.long_train_threshold]
    for t in range(k):
        g.report.tensors.append(Diff(name=f"loss_curve:losses[{t}]", shape=[], rel=float(d[t]), max_abs=float((e - r).abs()[t]),
                                     max_rel=float(d[t]), ok=float(d[t]) <= o.long_train_threshold))
    ok = stat < o.long_train_threshold and math.isfinite(stat)
    numbers = {"steps": k, "window": w, "window_mean_rel_diff": stat, "threshold": o.long_train_threshold,
               "max_rel_diff": float(d.max()), "first_step_over_threshold": over[0] if over else None,
               "engine_first_loss": float(e[0]), "engine_last_loss": float(e[-1]),
               "reference_first_loss": float(r[0]), "reference_last_loss": float(r[-1])}
    msg = (f"mean relative loss difference over the last {w} of {k} steps {stat:.3e} "
           f"{'<' if ok else '>='} {o.long_train_threshold:g}; reference loss {float(r[0]):.3f} -> {float(r[-1]):.3f}")
    loc = None
    if not ok:
        t = over[0] if over else int(d.argmax())
        loc = Localization(what=f"loss curve: step {t} first differs by {float(d[t]):.3e} (engine {float(e[t]):.5f}, "
                           f"reference {float(r[t]):.5f}); window mean {stat:.3e}", tensor="losses", step=t,
                           rel=float(d[t]), max_abs=float((e - r).abs()[t]), max_rel=float(d.max()))
    return Part(name="loss", verdict="passed" if ok else "failed", message=msg, numbers=numbers), loc


def mfu_part(g: GateRun, case_model: MiniCPMConfig) -> Part:
    o = g.options
    if o.device != "cuda":
        return Part(name="mfu", verdict="unsupported",
                    message=f"MFU is measured on GPU only (peak {PEAK_FLOPS / 1e12:.1f} TFLOP/s bf16); this run is on {o.device}",
                    numbers={"threshold": o.mfu_threshold})
    if not torch.cuda.is_available():
        return Part(name="mfu", verdict="unsupported", message="--device cuda but no CUDA device is visible")
    model, source = engine_model(g.engine.root, case_model)
    sandbox = g.sandbox(None, prefix="forge-bench-")
    out = sandbox.root / "bench.json"
    args = ["bench", "--seq-length", str(o.bench_seq_length), "--micro-batch-size", str(o.bench_micro_batch_size),
            "--steps", str(o.bench_steps), "--json", str(out)]
    try:
        g.run_engine(args, sandbox, "engine bench")
    except GateStop as stop:
        return Part(name="mfu", verdict=stop.verdict, message=stop.message)
    try:
        data = json.loads(out.read_text())
        tps = float(data["tokens_per_s"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Part(name="mfu", verdict="failed", message=f"bench wrote no usable JSON with tokens_per_s: {e}")
    finally:
        sandbox.remove()
    mfu = model.flops_per_token(o.bench_seq_length) * tps / PEAK_FLOPS
    ok = mfu >= o.mfu_threshold
    return Part(name="mfu", verdict="passed" if ok else "failed",
                message=f"MFU {mfu:.2%} {'>=' if ok else '<'} {o.mfu_threshold:.2%} ({model.name} from {source}, "
                        f"seq {o.bench_seq_length} x {o.bench_micro_batch_size}, {tps:.0f} tokens/s)",
                numbers={"mfu": mfu, "threshold": o.mfu_threshold, "tokens_per_s": tps,
                         "engine_reported_mfu": data.get("mfu"), "model": model.name, "model_source": source,
                         "seq_length": o.bench_seq_length, "micro_batch_size": o.bench_micro_batch_size,
                         "device": str(data.get("device"))})


def engine_model(root: Path, fallback: MiniCPMConfig) -> tuple[MiniCPMConfig, str]:
    """The model an engine is specialized for (its model_spec.toml [model]); else the case's."""
    spec = root / "model_spec.toml"
    if spec.is_file():
        try:
            return from_toml(spec), "model_spec.toml"
        except (ConfigError, ValueError):
            pass
    return fallback, "the case (no usable model_spec.toml [model])"
