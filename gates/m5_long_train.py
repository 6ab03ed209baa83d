"""M5 long train: the engine's own `pretrain` for K steps of real training (default corpus, default
tokenizer), its loss curve against the reference; and its speed, timed by the gate (GPU).

Parts and their rules:
- `loss`: `pretrain` (gates/train_contract.py: the engine's defaults plus the spec's production flags)
  and the reference's `steps` probe on the same case: fresh random weights (seeded), batches packed from
  the shipped default corpus (gates/case_data.py), K = `long_train_steps`, lr `long_train_lr` (1e-2) with
  warmup then WSD decay so the curve actually falls. With l_e(t), l_r(t) the per-step losses, d(t) = |l_e(t) - l_r(t)| /
  |l_r(t)|; the statistic is the mean of d(t) over the trailing window of W = min(`long_train_window`, K)
  steps. `passed` iff that mean < `long_train_threshold` (1 %) and every loss is finite. The report also
  gives max d(t) and the first step where d(t) exceeds the threshold (the localization).
- `mfu`: the gate's clock. `pretrain` runs twice on corpus cases at `speed_seq_length` x
  `speed_global_batch_size` rows in micro batches of `speed_micro_batch_size` (accumulation, as real
  pretraining): a warm run of `speed_steps` steps (compile caches), then one timed run of S + N steps,
  S = `speed_settle_steps`. N is `speed_steps` raised so that N steps should last `speed_target_timed_s` at
  the warm run's logged step time (at most `speed_max_steps`): a claim that only sizes the window. While the
  timed run runs, the gate stamps each log line's arrival on its own clock (gates/line_clock.py): a line
  carries its step's loss, checked below, so it cannot appear before the step is done. Tokens/s = N x rows x
  seq / (arrival of line S+N - arrival of line S), never more than the median gap between lines allows: the
  run's one-time costs (start-up, compile, capture, the final save) stay outside the window: they vary by
  seconds between runs (gates/line_clock.py says how much). A window under `speed_min_timed_s` is `error`; lines
  that never appear or appear all at once are `failed` (the contract asks for each step's line as it ends).
  FLOPs per token come from the case's model
  (the forge spec's), docs/DESIGN.md's formula, never from the engine's files; the device and its peak are
  read on the gate's side (989.4 TFLOP/s bf16 for H100 / H200 SXM). The timed run's losses must match the
  reference's on the same data (mean relative difference below `long_train_threshold`), so skipped work fails;
  that reference takes the engine's micro batches with fused attention (gates/stacks SPEED_STACKS: `torch-sdpa`
  for `torch`; a stack without one takes one row at a time). The clock's numbers are recorded before that
  check runs, and the per-step differences with it. The engine's own figures (its log's last line, the step
  times it logged) are recorded beside the gate's and decide nothing. On a CPU the part is `unsupported`
  unless a test gives a CPU peak (`cpu_peak_tflops`).

`m5_parts` runs one part alone (a GPU run split over machine calls of limited length); the other is then
`unsupported` ("not run"), so such a run never passes.

Overall verdict: the worse of the two parts (failed > error > unsupported > passed). So on CPU a
correct engine gets `unsupported` with `loss: passed` in the report, never a silent `passed`.
"""


from __future__ import annotations

import math
import shutil
import time

import torch

from gates.case import CaseError, OptimizerSpec, ScheduleSpec, make_spec
from gates.case_data import corpus_batches
from gates.context import GateRun, GateStop
from gates.launch import GateTimeout
from gates.line_clock import LineClock, line_window
from gates.model_config import MiniCPMConfig
from gates.policies import Diff
from gates.pretrain_runs import PretrainBox, logged_step_times, metrics_line
from gates.report import GateReport, Localization, Part, worst
from gates.stacks import SPEED_STACKS

PEAK_FLOPS = 989.4e12  # dense bf16 per H100 / H200 SXM GPU (docs/DESIGN.md)
PEAK_DEVICES = ("H100", "H200")
CURVE_K = 2.0  # bf16 loss curves: the engine may drift from fp32 twice as far as the bf16 reference does
SPEED_LR = 3e-4  # the timed runs must learn (skipped work shows in the loss) without bf16 chaos at 0.5B


def run(g: GateRun) -> GateReport:
    o = g.options
    if o.m5_parts == "mfu":  # the speed part writes its own case from the model: no long-train case to write
        loss_part, loc = not_run("loss", o.m5_parts), None
        try:
            model = g.preset_spec().model if g.is_preset() else g.make_case().spec.model
        except CaseError as e:
            raise GateStop("error", str(e), "case") from None
    else:
        loss_part, loc, model = long_train(g)
    parts = [loss_part, not_run("mfu", o.m5_parts) if o.m5_parts == "loss" else speed_part(g, model)]
    g.report.parts = parts
    verdict = worst([p.verdict for p in parts])
    if verdict == "passed":
        return g.finish("passed", "pretrain's loss curve and its speed on the gate's clock within bounds")
    summary = "; ".join(f"{p.name}: {p.verdict}" for p in parts)
    if verdict == "unsupported":
        summary += " -> not passed: " + "; ".join(p.message for p in parts if p.verdict == "unsupported")
    return g.finish(verdict, summary, loc)


def not_run(name: str, chosen: str) -> Part:
    return Part(name=name, verdict="unsupported", message=f"not run: this run asked for M5's {chosen} part alone")


def long_train(g: GateRun) -> tuple[Part, Localization | None, MiniCPMConfig]:
    """The loss part: `pretrain` on the long-train case (a preset's: the default corpus, lr `long_train_lr` with
    warmup and WSD decay) against the reference and, for bf16, its float32 twin; with the case's model."""
    o = g.options
    if g.is_preset():
        k = o.long_train_steps
        try:
            spec = g.preset_spec(steps=k, world_size=1, grad_accum=1, optimizer=OptimizerSpec(lr=o.long_train_lr, min_lr=o.long_train_lr / 10),
                                 schedule=ScheduleSpec(kind="wsd", warmup_steps=max(1, k // 10),
                                                       decay_steps=max(1, k // 5)))
        except CaseError as e:
            raise GateStop("error", str(e), "case") from None
        case = g.write_case(spec, batches=corpus_batches(spec, spec.seed), label="case (default corpus)")
    else:
        case = g.make_case()
    box = PretrainBox(g, case)
    try:
        box.run("long", "engine pretrain (long train)", extra=o.pretrain_args)
        eng = box.series("long", 1, case.spec.steps, "engine pretrain (long train)")
    except GateStop as stop:
        stop.verdict = "failed" if stop.verdict == "unsupported" else stop.verdict
        raise
    ref = g.reference_probe("steps", case)
    ref32 = None
    if case.spec.dtype == "bfloat16":
        fp32 = g.write_case(case.spec.model_copy(update={"dtype": "float32"}), batches=case.batches, weights=case.weights,
                            label="the same case in float32 (the loss curve's baseline)")
        ref32 = g.reference_probe("steps", fp32)["losses"]
    return (*loss_curve(g, eng["losses"], ref["losses"], ref32), case.spec.model)


def loss_curve(g: GateRun, eng: torch.Tensor, ref: torch.Tensor,
               ref32: torch.Tensor | None = None) -> tuple[Part, Localization | None]:
    """The loss part. With `ref32` (bf16 cases: the reference in float32 on the same weights and data), both
    curves are measured against it, and the bound is the larger of the threshold and CURVE_K x the bf16
    reference's own window mean deviation: two correct bf16 runs drift apart by their rounding, not by bugs."""
    o = g.options
    e, r = eng.double(), ref.double()
    base = r if ref32 is None else ref32.double()
    d = (e - base).abs() / base.abs()
    k = d.numel()
    w = min(o.long_train_window, k)
    stat = float(d[-w:].mean())
    bound, ref_stat = o.long_train_threshold, None
    if ref32 is not None:
        ref_stat = float(((r - base).abs() / base.abs())[-w:].mean())
        bound = max(bound, CURVE_K * ref_stat)
    over = [t for t in range(k) if float(d[t]) > bound]
    for t in range(k):
        g.report.tensors.append(Diff(name=f"loss_curve:losses[{t}]", shape=[], rel=float(d[t]), max_abs=float((e - base).abs()[t]),
                                     max_rel=float(d[t]), ok=float(d[t]) <= bound))
    ok = stat < bound and math.isfinite(stat)
    numbers = {"steps": k, "window": w, "window_mean_rel_diff": stat, "threshold": o.long_train_threshold,
               "bound": bound, "reference_bf16_window_mean_rel_diff": ref_stat,
               "max_rel_diff": float(d.max()), "first_step_over_threshold": over[0] if over else None,
               "engine_first_loss": float(e[0]), "engine_last_loss": float(e[-1]),
               "reference_first_loss": float(r[0]), "reference_last_loss": float(r[-1])}
    against = "the reference" if ref32 is None else (f"the float32 reference (the bf16 reference's own: {ref_stat:.3e}; "
                                                       f"bound max({o.long_train_threshold:g}, {CURVE_K:g} x that))")
    msg = (f"mean relative loss difference from {against} over the last {w} of {k} steps {stat:.3e} "
           f"{'<' if ok else '>='} {bound:.3g}; reference loss {float(r[0]):.3f} -> {float(r[-1]):.3f}")
    loc = None
    if not ok:
        t = over[0] if over else int(d.argmax())
        loc = Localization(what=f"loss curve: step {t} first differs by {float(d[t]):.3e} (engine {float(e[t]):.5f}, "
                           f"reference {float(base[t]):.5f}); window mean {stat:.3e}", tensor="losses", step=t,
                           rel=float(d[t]), max_abs=float((e - base).abs()[t]), max_rel=float(d.max()))
    return Part(name="loss", verdict="passed" if ok else "failed", message=msg, numbers=numbers), loc


def device_peak(g: GateRun) -> tuple[str, float | None, str]:
    """(device name, peak FLOP/s or None, why none), read in the gate's own process."""
    o = g.options
    if o.device == "cuda":
        if not torch.cuda.is_available():
            return "none", None, "--device cuda but no CUDA device is visible"
        name = torch.cuda.get_device_name(0)
        if any(k in name for k in PEAK_DEVICES):
            return name, PEAK_FLOPS, ""
        return name, None, f"no dense bf16 peak known for {name} (known: {', '.join(PEAK_DEVICES)})"
    if o.cpu_peak_tflops is not None:
        return "cpu", o.cpu_peak_tflops * 1e12, ""
    return o.device, None, f"MFU is measured on GPU only (peak {PEAK_FLOPS / 1e12:.1f} TFLOP/s bf16); this run is on {o.device}"


def sized_steps(warm_step_times: list[float], n: int, target_s: float, max_steps: int) -> int:
    """The timed steps: at least `n`, raised so they should take `target_s` at the warm run's median logged
    step time after its first two steps (compile, capture). The engine's claim only sizes the window."""
    times = warm_step_times[2:] or warm_step_times
    if not times or target_s <= 0:
        return n
    per_step = sorted(times)[len(times) // 2]
    if not per_step > 0:
        return max(n, max_steps)
    return max(n, min(max_steps, math.ceil(target_s / per_step)))


def timed_run(g: GateRun, box: PretrainBox, name: str, steps: int) -> tuple[float, dict[int, float]]:
    """One `pretrain` of `steps` steps in `box`: its wall time on the gate's clock and its log lines' arrivals
    (gates/line_clock.py). Its checkpoint goes once it ends: only the log is read, and the runs' checkpoints at
    once would not fit a GPU machine's disk at 8B shapes."""
    before = len(g.report.commands)
    with LineClock(box.log(name)) as clock:
        box.run(name, f"engine pretrain {steps} steps (speed, {name})",
                args=box.args(name, g.options.pretrain_args, steps=steps))
    shutil.rmtree(box.save_dir(name), ignore_errors=True)
    return g.report.commands[before].time_s, clock.stamps


def loss_diffs(log: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per-step relative differences of the timed run's losses from the reference's, summarized for the report
    (bf16 trajectories drift apart with the steps; a bug shows from the first steps)."""
    d = (log - ref[: len(log)].double()).abs() / ref[: len(log)].double().abs()
    half = max(1, len(d) // 2)
    return {"loss_mean_rel_diff": float(d.mean()), "loss_max_rel_diff": float(d.max()),
            "loss_mean_rel_diff_first_half": float(d[:half].mean()),
            "loss_mean_rel_diff_second_half": float(d[half:].mean()) if len(d) > half else float(d.mean()),
            "loss_rel_diff_by_step": " ".join(f"{float(x):.2e}" for x in d)}


def speed_part(g: GateRun, model: MiniCPMConfig) -> Part:
    """Time `pretrain` from outside: steps settle+1..M of one run, between their log lines' arrivals on the
    gate's clock, on a corpus case; see the module doc."""
    o = g.options
    device, peak, why = device_peak(g)
    if peak is None:
        return Part(name="mfu", verdict="unsupported", message=why, numbers={"threshold": o.mfu_threshold})
    n, settle, rows, micro = o.speed_steps, o.speed_settle_steps, o.speed_global_batch_size, o.speed_micro_batch_size
    seq = o.speed_seq_length
    if rows % micro:
        return Part(name="mfu", verdict="error", message=f"speed_global_batch_size {rows} is not a multiple of "
                    f"speed_micro_batch_size {micro}")
    def speed_case(steps: int, weights=None):
        spec = make_spec(model, steps=steps, world_size=1, micro_batch_size=micro, grad_accum=rows // micro,
                         seq_length=seq, dtype=o.case_dtype, device=o.device, seed=(o.seed or 0) + 7,
                         optimizer=OptimizerSpec(lr=SPEED_LR, min_lr=SPEED_LR),
                         schedule=ScheduleSpec(kind="constant", warmup_steps=2))
        return spec, g.write_case(spec, batches=corpus_batches(spec, spec.seed), weights=weights,
                                  label=f"speed case ({steps} steps)")

    target_s, floor_s = o.speed_window_s()
    t_case = time.monotonic()
    spec, case = speed_case(settle + n)
    box = PretrainBox(g, case)
    walls: dict[str, float] = {"cases": time.monotonic() - t_case}
    try:
        walls["warm"], _ = timed_run(g, box, "warm", n)
        n = sized_steps(logged_step_times(box.log("warm")), n, target_s, o.speed_max_steps)
        total = settle + n
        if total != spec.steps:  # the timed case, on the same weights, in the same box; the warm run's caches apply
            t_case = time.monotonic()
            spec, case = speed_case(total, weights=case.weights)
            box.use_case(case)
            walls["cases"] += time.monotonic() - t_case
        walls["timed"], stamps = timed_run(g, box, "timed", total)
        log = box.series("timed", 1, total, "speed run")
    except GateStop as stop:
        return Part(name="mfu", verdict="failed" if stop.verdict == "unsupported" else stop.verdict, message=stop.message)
    dt, lines = line_window(stamps, settle, total)
    claimed = {name: logged_step_times(box.log(name)) for name in ("warm", "timed")}  # the engine's own step times
    flops = model.flops_per_token(seq)
    tokens = rows * seq
    numbers = {"threshold": o.mfu_threshold, "device": device, "model": model.name, "flops_per_token": flops,
               "flops_source": "the case's model (forge spec), docs/DESIGN.md's formula", "seq_length": seq,
               "global_batch_size": rows, "micro_batch_size": micro, "settle_steps": settle, "timed_steps": n,
               "run_steps": total, "clock": "gate-stamped arrivals of the run's log lines (gates/line_clock.py)",
               "timed_window_s": dt, "min_timed_s": floor_s, "wall_warm_s": walls["warm"], "wall_timed_s": walls["timed"],
               "wall_cases_s": round(walls["cases"], 3), "gate_budget_s": o.timeout_s,
               "whole_run_tokens_per_s": total * tokens / walls["timed"], **lines,
               "engine_log_last_line": metrics_line(box.log("timed")),
               "engine_steps_sum_s_timed": round(sum(claimed["timed"][settle:total]), 3),
               **{f"engine_step_times_s_{name}": " ".join(f"{t:.4g}" for t in times) for name, times in claimed.items()}}
    if dt is not None and dt > 0:  # recorded whatever the verdict, the reference's check included
        numbers |= {"tokens_per_s": n * tokens / dt, "step_time_s": dt / n, "mfu": flops * n * tokens / dt / peak}
    # The reference checks the same global batches: in the engine's micro batches where its stack has fused
    # attention (memory linear in the sequence), else one row at a time (unfused scores of 8 x 4096^2 per layer
    # filled an H100).
    stack = SPEED_STACKS.get(o.reference)
    ref_micro = micro if stack is not None else 1
    ref_spec = spec.model_copy(update={"micro_batch_size": ref_micro, "grad_accum": rows // ref_micro})
    t_ref = time.monotonic()  # where the budget went is recorded, so a run that ran out says which phase to grow
    try:
        ref = g.reference_probe("steps", g.write_case(ref_spec, batches=case.batches, weights=case.weights,
                                                      label=f"the speed case, {ref_micro} row(s) per reference micro batch"),
                                twin=False, stack=stack or o.reference)
    except GateStop as stop:  # the clock's numbers stay in the report; without the loss check they decide nothing
        numbers["wall_reference_s"] = round(time.monotonic() - t_ref, 3)
        return Part(name="mfu", verdict="error" if stop.verdict in ("passed", "unsupported") else stop.verdict,
                    numbers=numbers, message=f"the timed run's losses were not checked: {stop.message}")
    except GateTimeout as e:  # likewise when the gate's budget ends inside the reference's run
        numbers["wall_reference_s"] = round(time.monotonic() - t_ref, 3)
        return Part(name="mfu", verdict="error", numbers=numbers, message=f"the timed run's losses were not checked: "
                    f"{e} (the reference had {numbers['wall_reference_s']:.0f}s of it; raise the gate's timeout)")
    numbers["wall_reference_s"] = round(time.monotonic() - t_ref, 3)
    numbers |= loss_diffs(log["losses"], ref["losses"])
    mean_diff = numbers["loss_mean_rel_diff"]
    if not mean_diff < o.long_train_threshold:
        return Part(name="mfu", verdict="failed", numbers=numbers,
                    message=f"the timed run's losses differ from the reference's on the same data (mean relative "
                            f"difference {mean_diff:.3e} >= {o.long_train_threshold:g}): the timed work is not the "
                            "training the reference does")
    if dt is None:
        return Part(name="mfu", verdict="failed", numbers=numbers,
                    message=f"the gate never saw some of the timed steps' log lines appear ({lines['lines_missing']}): "
                            "the training contract asks for each step's line as the step ends")
    if dt <= 0:
        return Part(name="mfu", verdict="failed", numbers=numbers,
                    message=f"the log lines of steps {settle + 1}..{total} all appeared at once: the gate cannot time "
                            "steps whose lines are not written as they end (the training contract asks for that)")
    if dt < floor_s:
        return Part(name="mfu", verdict="error", numbers=numbers,
                    message=f"the timed window ({n} steps: {dt:.1f}s between the arrivals of the lines of steps "
                            f"{settle} and {total}) is shorter than {floor_s:g}s; raise speed_steps or "
                            "speed_target_timed_s (the sizing took the step count from the warm run's logged step times)")
    tps, mfu = numbers["tokens_per_s"], numbers["mfu"]
    ok = mfu >= o.mfu_threshold
    return Part(name="mfu", verdict="passed" if ok else "failed", numbers=numbers,
                message=f"MFU {mfu:.2%} {'>=' if ok else '<'} {o.mfu_threshold:.2%} on the gate's clock ({tps:,.0f} "
                        f"tokens/s on {device}: {model.name}, seq {seq}, global batch {rows} in micro batches of "
                        f"{micro}, {n} steps timed between the arrivals of the lines of steps {settle} and {total})")
