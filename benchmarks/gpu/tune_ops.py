"""Stage 2's tune search on one GPU, op after op, within one time budget: each op's implementation searched over
the space the engine declares, every candidate checked and timed by the per-op harness (gates/ops), as the
`tune` backend's rounds do (harness/agents/tune.py: `tune_op`). By default the ops tuned are the ones the engine's
default step runs on the device (`auto`'s resolution there) that declare a space: tuning an implementation the
step does not run changes nothing users get. With CuTeDSL installed that includes the FA4 and quack ops.

    python3 -m benchmarks.gpu.tune_ops --out DIR --budget-s 260                # H200: 0.5B shapes, bf16, seq 4096, mb 8
    python3 -m benchmarks.gpu.tune_ops --out DIR --budget-s 100 --device cpu   # CPU: tiny preset, fp32, interpreter

Each op gets an equal share of what is left of the budget (a trial started in its share may finish after it; none
outlives the budget). The declared defaults are tried first, so each op has its default's time beside the winner's.
Written as it goes, so a cut or a kill leaves what was done, under DIR:
  forge/leaderboards/<op>.json  every candidate (checks, timing, hardware, versions): the export's layout
  summary.json, summary.md      per op: winner, its time, TFLOP/s, GB/s, % of roofline, the default's time, speedup
  tuned/configs.json            the winners under this runtime's key, in the engine's tuned-config format
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

from gates.ops.harness import CandidateResult, EngineOps, HarnessOptions, OpSpecError, describe, record
from harness.agents.tune import (TuneError, TuneOptions, Window, best_trial, check_options, search_space, tune_op,
                                 write_tuned)

ENGINE = Path(__file__).resolve().parents[2] / "exports" / "train_engine_0.5B"
# per device: preset, dtype, micro batch, sequence, reps, warmup
DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": dict(preset="minicpm4-0.5b", dtype="bfloat16", batch=8, seq=4096, reps=50, warmup=5),
    "cpu": dict(preset="tiny", dtype="float32", batch=1, seq=16, reps=3, warmup=1),
}
# the engine's step runs as one CUDA graph: every capturable op is timed as a graph replay, without host gaps
GRAPH_BELOW_MS = 1000.0
RESERVE_S = 2.0  # kept back from the budget for the last writes


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=260.0, help="wall seconds for everything, describe included")
    ap.add_argument("--device", choices=sorted(DEFAULTS), default="cuda")
    ap.add_argument("--engine", type=Path, default=ENGINE)
    ap.add_argument("--ops", default=None, help="comma-separated, searched in this order (default: the ops the "
                    "engine's default step runs on the device that declare a space)")
    ap.add_argument("--max-trials", type=int, default=8, help="per op, the default's trial included")
    ap.add_argument("--random-trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    for name in ("preset", "dtype"):
        ap.add_argument(f"--{name}", default=None, help="default: by device (DEFAULTS)")
    for name in ("batch", "seq", "reps", "warmup"):
        ap.add_argument(f"--{name}", type=int, default=None, help="default: by device (DEFAULTS)")
    a = ap.parse_args(argv)
    for k, v in DEFAULTS[a.device].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def default_path(engine_ops: EngineOps, device: str) -> list[tuple[str, str]]:
    """(op, impl) for each op the engine's default step runs on `device` (EngineOps.default_candidate: not the
    reference, unfused or fused into another op) with an implementation that declares a space, in resolution order."""
    out = []
    for op in engine_ops.resolved.get(device, {}).get("names", {}):
        c = engine_ops.default_candidate(op, device)
        impls = engine_ops.table.get(op.partition(".")[0], {}).get("impls", {})
        if c is not None and impls.get(c.impl, {}).get("space"):
            out.append((op, c.impl))
    return out


def _row(op: str, impl: str | None, trials: list[CandidateResult], baseline: dict | None, status: str,
         on_path: bool = False) -> dict:
    """The summary's line for one op."""
    best = best_trial(trials)
    default = next((t for t in trials if t.values == baseline), None)
    timing = (best.timing or {}) if best else {}
    default_ms = default.ms if default else None
    return {"op": op, "impl": impl, "on_default_path": on_path, "status": status, "trials": len(trials),
            "failed": sum(t.verdict == "failed" for t in trials),  # wrong, or crashed: rejected by the harness
            "errors": sum(t.verdict == "error" for t in trials),  # the child timed out (the budget) or died
            "winner": best.values if best else None, "winner_ms": best.ms if best else None,
            "tflops": timing.get("tflops"), "gbps": timing.get("gbps"), "roofline_pct": timing.get("roofline_pct"),
            "bound": timing.get("bound"), "graphed": timing.get("graphed"), "l2_flushed": timing.get("l2_flushed"),
            "default": baseline, "default_ms": default_ms,
            "speedup": default_ms / best.ms if best and default_ms else None}


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def write_summary(out: Path, head: dict, rows: list[dict]) -> None:
    (out / "summary.json").write_text(json.dumps(head | {"ops": rows}, indent=1, default=str) + "\n")
    lines = [f"# tune_ops: {head['runtime'].get('device')} ({head['preset']}, {head['dtype']}, batch {head['batch']} "
             f"x seq {head['seq']}), {head['elapsed_s']:.0f} of {head['budget_s']:.0f} s",
             "", "| op | impl | on the default step | winner | ms | TFLOP/s | GB/s | % roofline | default ms | "
             "speedup | trials (failed, errors) | status |", "|" + "---|" * 12]
    for r in rows:
        winner = json.dumps(r["winner"]) if r["winner"] is not None else "-"
        lines.append(f"| {r['op']} | {r['impl']} | {'yes' if r.get('on_default_path') else 'no'} | `{winner}` | {_fmt(r['winner_ms'])} | {_fmt(r['tflops'], '.1f')} | "
                     f"{_fmt(r['gbps'], '.0f')} | {_fmt(r['roofline_pct'], '.1f')} | {_fmt(r['default_ms'])} | "
                     f"{_fmt(r['speedup'], '.3f')} | {r['trials']} ({r['failed']}, {r['errors']}) | {r['status']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    t0 = time.monotonic()
    end = t0 + a.budget_s - RESERVE_S
    a.out.mkdir(parents=True, exist_ok=True)
    harness = HarnessOptions(device=a.device, dtype=a.dtype, batch=a.batch, seq=a.seq, reps=a.reps, warmup=a.warmup,
                             graph_below_ms=GRAPH_BELOW_MS)
    engine_ops = describe(a.engine, timeout_s=max(1.0, end - time.monotonic()))
    runtime = engine_ops.runtime[a.device]
    head = {"runtime": runtime, "host": platform.node(), "engine": str(a.engine), "preset": a.preset,
            "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "budget_s": a.budget_s, "harness": harness.model_dump()}
    options = TuneOptions(max_trials=a.max_trials, random_trials=a.random_trials, seed=a.seed, harness=harness)
    on_path = dict(default_path(engine_ops, a.device))
    ops = [o for o in a.ops.split(",") if o] if a.ops is not None else list(on_path)
    if not ops:
        print(f"[tune_ops] nothing to tune: no op of the default step on {a.device} declares a space", flush=True)
    rows: list[dict] = []

    def flush(current: list[dict]) -> None:
        write_summary(a.out, head | {"elapsed_s": time.monotonic() - t0}, current)

    shortest = [0.0]  # the shortest trial so far: one is not started with less time left than that

    for i, op in enumerate(ops):
        share = (end - time.monotonic()) / (len(ops) - i)
        window = Window(last_start=min(time.monotonic() + share, end - shortest[0]), end=end)
        try:
            impl = check_options(options.model_copy(update={"impl": on_path.get(op)}), engine_ops, op, a.device)
            space = search_space(engine_ops, op, impl, {})
        except (OpSpecError, TuneError) as e:
            rows.append(_row(op, None, [], None, f"error: {e}", on_path=op in on_path))
            print(f"[tune_ops] {op}: {e}", flush=True)
            flush(rows)
            continue
        baseline = {n: p["default"] for n, p in engine_ops.space(op, impl).items()}
        trials: list[CandidateResult] = []
        started = [time.monotonic()]

        def on_trial(r: CandidateResult, op: str = op, impl: str = impl, trials: list = trials,
                     baseline: dict = baseline, started: list = started) -> None:
            now = time.monotonic()
            if r.verdict != "error":
                shortest[0] = min(shortest[0] or math.inf, now - started[0])
            started[0] = now
            trials.append(r)
            record(a.out, r, options=harness, source=f"tune_ops ({a.device}, seed {a.seed})")
            ms = f"{r.ms:.4g} ms" if r.ms is not None else r.message[:300]
            print(f"[tune_ops] {op}={impl} {json.dumps(r.values)}: {r.verdict}, {ms} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
            flush([*rows, _row(op, impl, trials, baseline, "running", on_path.get(op) == impl)])

        print(f"[tune_ops] {op}={impl}: space {json.dumps(space)}, {share:.0f} s", flush=True)
        tune_op(a.engine, op, impl, space, options, preset=a.preset, engine_ops=engine_ops, baseline=baseline,
                window=window, on_trial=on_trial)
        planned = min(math.prod(len(v) for v in space.values()), a.max_trials)
        cut = len(trials) < planned and time.monotonic() >= window.last_start
        best = best_trial(trials)
        rows.append(_row(op, impl, trials, baseline, "cut by its time share" if cut else "done", on_path.get(op) == impl))
        if best is not None:
            write_tuned(a.out / "tuned" / "configs.json", runtime, op, impl, best.values)
        flush(rows)
    print((a.out / "summary.md").read_text(), flush=True)
    return 0 if any(r.get("winner_ms") is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
