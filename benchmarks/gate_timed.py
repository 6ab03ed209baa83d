"""An engine's row on the gates' clock: its `pretrain` at its defaults, timed from outside by M5's speed part
(the arrivals of its log lines on the gate's clock, tokens from the data the gate handed in, FLOPs from the model, the device read
here, the timed steps' losses checked against the reference). Beside it, the engine's own `bench` row is
labelled as self-reported; only this row is a figure that counts (README.md, "what users run").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.stacks import Stack


def gate_timed_row(stack: Stack, args: argparse.Namespace, mbs: int, out: Path, deadline: float | None = None) -> dict:
    """One comparison row for engine `stack`: M5's speed part on `args.model` at `args.seq_length`, micro batch
    `mbs`, global batch `args.global_batch_size` (default: `mbs`, no accumulation, as the other rows), N =
    `args.steps` timed steps. The row's status is `ok` only when the gate measured a figure and the timed
    steps trained as the reference does."""
    from gates.context import GateRun
    from gates.launch import discover_engine
    from gates.m5_long_train import speed_part
    from gates.model_config import load
    from gates.options import GateOptions

    name = f"{stack.name} pretrain (gate-timed)"
    row: dict = {"stack": name, "kind": "engine", "source": "gate", "micro_batch_size": mbs, "attempts": [],
                 "note": "pretrain at its defaults, timed by M5's speed part: its log lines' arrivals on the gate's clock"}
    budget = args.timeout * 3 if deadline is None else min(args.timeout * 3, deadline - time.monotonic())
    if budget < 60:
        return row | {"status": "skipped", "message": "run budget (--budget) spent before this row"}
    rows = args.global_batch_size or mbs
    options = GateOptions(case=args.model, device=args.device, seed=args.seed, speed_steps=args.steps,
                          speed_seq_length=args.seq_length, speed_micro_batch_size=mbs, speed_global_batch_size=rows,
                          mfu_threshold=0.0, timeout_s=budget, cpu_peak_tflops=args.cpu_peak_tflops,
                          out_dir=out / "gate-timed")
    g = GateRun("m5_long_train", discover_engine(stack.engine_dir), options)
    t0 = time.perf_counter()
    try:
        part = speed_part(g, load(args.model))
    finally:
        g.cleanup()
    n = part.numbers
    row |= {"wall_s": time.perf_counter() - t0, "global_batch_size": rows, "gate": {"verdict": part.verdict,
            "message": part.message, "numbers": n}}
    if part.verdict != "passed" or "tokens_per_s" not in n:
        return row | {"status": "unsupported" if part.verdict == "unsupported" else "error", "message": part.message}
    return row | {"status": "ok", "tokens_per_s": n["tokens_per_s"], "step_time_s": n["step_time_s"],
                  "message": part.message}
