"""Run gates on one GPU as the forge loop does, and write each report plus a one-line-per-gate summary.

    python3 -m benchmarks.gpu.gate_stage --engine exports/train_engine_0.5B --gates m7,m5 --out DIR [--seed N]

Cases are the full MiniCPM4-0.5B config in bf16 on cuda against the torch reference; M5's speed part times
`pretrain` with its defaults at seq 4096, global batch 64 in micro batches of 8 (options below).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gates.report import print_summary
from gates.runner import GateOptions, resolve_name, run_gate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", type=Path, required=True)
    ap.add_argument("--gates", default="m7,m5", help="comma-separated gate names or aliases, run in this order")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--case", default="minicpm4-0.5b")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--seq-length", type=int, default=2048, help="M1-M4 / M6-M8 cases")
    ap.add_argument("--long-train-steps", type=int, default=20)
    ap.add_argument("--speed-steps", type=int, default=10)
    ap.add_argument("--speed-seq-length", type=int, default=4096)
    ap.add_argument("--speed-global-batch-size", type=int, default=64)
    ap.add_argument("--speed-micro-batch-size", type=int, default=8)
    ap.add_argument("--mfu-threshold", type=float, default=0.36)
    ap.add_argument("--m5-parts", default="both", choices=("both", "loss", "mfu"),
                    help="M5's parts to run (one alone fits a 10-minute device call; the other reads unsupported)")
    ap.add_argument("--sandbox", default=None, help="required | preferred | off (default: the gates' default)")
    ap.add_argument("--timeout", type=float, default=900.0)
    a = ap.parse_args(argv)
    fields = dict(case=a.case, device="cuda", dtype="bfloat16", seed=a.seed, seq_length=a.seq_length, micro_batch_size=1,
                  steps=4, long_train_steps=a.long_train_steps, speed_steps=a.speed_steps,
                  speed_seq_length=a.speed_seq_length, speed_global_batch_size=a.speed_global_batch_size,
                  speed_micro_batch_size=a.speed_micro_batch_size, mfu_threshold=a.mfu_threshold, m5_parts=a.m5_parts, timeout_s=a.timeout,
                  out_dir=a.out)
    if a.sandbox is not None:
        fields["sandbox"] = a.sandbox
    options = GateOptions(**fields)
    a.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in a.gates.split(","):
        t0 = time.monotonic()
        report = run_gate(resolve_name(name.strip()), a.engine, options)
        print_summary([report])
        parts = {p.name: {"verdict": p.verdict, "message": p.message, "numbers": p.numbers} for p in report.parts}
        lines.append({"gate": report.gate, "verdict": report.verdict, "message": report.message,
                      "wall_s": round(time.monotonic() - t0, 1), "parts": parts,
                      "hardware": report.hardware, "versions": report.versions})
        (a.out / "summary.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return 0 if all(x["verdict"] == "passed" for x in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
