"""Run gates on one GPU as the forge loop does, and write each report plus a one-line-per-gate summary.

    python3 -m benchmarks.gpu.gate_stage --engine exports/train_engine_0.5B --gates m7,m5 --out DIR [--seed N]
    python3 -m benchmarks.gpu.gate_stage ... --gates m1,m2,m3/m6,m7/m8 --out DIR   # three lanes at once

`/` splits the gates into lanes: each lane is a child process of its own (its reports under DIR/lane<i>/), all
lanes run at once on the one GPU and the summary merges theirs. Correctness gates do not care that they share
the GPU, and most of a gate's wall time is the engine's start-up on the CPU; never put M5's speed part in a lane
beside others (it times the GPU). Lanes share the disk too: at the 0.5B's size each of M5-M8 holds about 25 GB
(initial weights, checkpoints, dump-states, exports, the reference's outputs) while it runs, so the parent prints the
free space of the temporary folder and warns below TRAINING_GATE_GB per lane that runs one.

Cases are the full MiniCPM4-0.5B config (or --case) in bf16 on cuda against the torch reference (or
--reference megatron, which answers M1-M3's probes; the others read unsupported); M5's speed part times
`pretrain` with its defaults at seq 4096, global batch 64 in micro batches of 8 (options below).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gates.report import print_summary
from gates.runner import GateOptions, resolve_name, run_gate
from harness.procs import Interrupted, exit_code, stop_signals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", type=Path, required=True)
    ap.add_argument("--gates", default="m7,m5", help="comma-separated gate names or aliases, run in this order; "
                                                    "'/' separates lanes run at once")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--case", default="minicpm4-0.5b")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--seq-length", type=int, default=2048, help="M1-M4 / M6-M8 cases")
    ap.add_argument("--long-train-steps", type=int, default=20)
    ap.add_argument("--speed-steps", type=int, default=10)
    ap.add_argument("--speed-seq-length", type=int, default=4096)
    ap.add_argument("--speed-global-batch-size", type=int, default=64)
    ap.add_argument("--speed-micro-batch-size", type=int, default=8)
    ap.add_argument("--speed-target-timed-s", type=float, default=None,
                    help="M5 speed part's timed window (default: the gates' own, 20 s on a GPU)")
    ap.add_argument("--mfu-threshold", type=float, default=0.36)
    ap.add_argument("--m5-parts", default="both", choices=("both", "loss", "mfu"),
                    help="M5's parts to run (one alone fits a 10-minute device call; the other reads unsupported)")
    ap.add_argument("--reference", default="torch", choices=("torch", "megatron"),
                    help="the reference stack (megatron answers the forward, backward and steps probes only)")
    ap.add_argument("--sandbox", default=None, help="required | preferred | off (default: the gates' default)")
    ap.add_argument("--timeout", type=float, default=900.0)
    a = ap.parse_args(argv)
    lanes = [x for x in a.gates.split("/") if x.strip()]
    if len(lanes) > 1:
        if any("m5_long_train" in lane_gates(lane) for lane in lanes) and a.m5_parts != "loss":
            ap.error("M5's speed part times the GPU: run it alone, or give --m5-parts loss when M5 shares a lane")
        return run_lanes(lanes, a.out, list(argv if argv is not None else sys.argv[1:]))
    fields = dict(case=a.case, reference=a.reference, device="cuda", dtype="bfloat16", seed=a.seed,
                  seq_length=a.seq_length, micro_batch_size=1,
                  steps=4, long_train_steps=a.long_train_steps, speed_steps=a.speed_steps,
                  speed_seq_length=a.speed_seq_length, speed_global_batch_size=a.speed_global_batch_size,
                  speed_micro_batch_size=a.speed_micro_batch_size, speed_target_timed_s=a.speed_target_timed_s,
                  mfu_threshold=a.mfu_threshold, m5_parts=a.m5_parts, timeout_s=a.timeout,
                  out_dir=a.out)
    if a.sandbox is not None:
        fields["sandbox"] = a.sandbox
    options = GateOptions(**fields)
    a.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in a.gates.split(","):
        t0 = time.monotonic()
        try:  # the part's timeout (SIGTERM): the gate's engine commands and work folders end with it
            with stop_signals():
                report = run_gate(resolve_name(name.strip()), a.engine, options)
        except Interrupted as e:
            print(f"{name}: {e}; its processes and work folders are gone", flush=True)
            return exit_code(e.signum)
        print_summary([report])
        parts = {p.name: {"verdict": p.verdict, "message": p.message, "numbers": p.numbers} for p in report.parts}
        lines.append({"gate": report.gate, "verdict": report.verdict, "message": report.message,
                      "wall_s": round(time.monotonic() - t0, 1), "parts": parts,
                      "hardware": report.hardware, "versions": report.versions})
        (a.out / "summary.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return 0 if all(x["verdict"] == "passed" for x in lines) else 1


TRAINING_GATE_GB = 25
TRAINING_GATES = ("m5_long_train", "m6_checkpoint", "m7_pretrain", "m8_resume")


def lane_gates(lane: str) -> list[str]:
    """A lane's gates by their full names (aliases such as m5 resolved; an unknown name raises KeyError)."""
    return [resolve_name(g.strip()) for g in lane.split(",") if g.strip()]


def disk_note(lanes: list[str], free_gb: float) -> str:
    """The free space against what the lanes' training gates hold at once (a warning when short)."""
    heavy = sum(any(g in TRAINING_GATES for g in lane_gates(lane)) for lane in lanes)
    need = heavy * TRAINING_GATE_GB
    msg = f"[lanes] {free_gb:.0f} GB free in the temporary folder; {heavy} lane(s) with M5-M8 hold ~{need} GB at once"
    return msg + (": WARNING, short of disk (ENOSPC fails gates as `error`)" if free_gb < need else "")


def lane_argv(argv: list[str], gates: str, out: Path) -> list[str]:
    """The parent's arguments with --gates and --out replaced by one lane's."""
    rest: list[str] = []
    skip = False
    for w in argv:
        if skip:
            skip = False
            continue
        if w in ("--gates", "--out"):
            skip = True
            continue
        if w.startswith(("--gates=", "--out=")):
            continue
        rest.append(w)
    return [*rest, "--gates", gates, "--out", str(out)]


def merge_lanes(lanes: list[str], out: Path, rcs: list[int]) -> list[dict]:
    """The lanes' summary lines (each with its lane), an `error` line for every gate a lane never reported, all
    written to out/summary.jsonl."""
    lines: list[dict] = []
    for i, (lane, rc) in enumerate(zip(lanes, rcs)):
        f = out / f"lane{i}" / "summary.jsonl"
        got = [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []
        lines += [{**x, "lane": i} for x in got]
        wanted = [g.strip() for g in lane.split(",") if g.strip()]  # as given: the gates a lane never reached
        if len(got) < len(wanted):
            lines.append({"gate": ",".join(wanted[len(got):]), "verdict": "error", "lane": i,
                          "message": f"lane{i} ended (exit {rc}) before these gates reported"})
    (out / "summary.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


def run_lanes(lanes: list[str], out: Path, argv: list[str]) -> int:
    """Each lane a child gate_stage.py at once; their summaries merged (lane and its wall time added) into
    out/summary.jsonl once all have ended. Exit 0 only when every gate of every lane passed."""
    out.mkdir(parents=True, exist_ok=True)
    print(disk_note(lanes, shutil.disk_usage(tempfile.gettempdir()).free / 1e9), flush=True)
    t0 = time.monotonic()
    procs = []
    for i, lane in enumerate(lanes):
        d = out / f"lane{i}"
        d.mkdir(parents=True, exist_ok=True)
        log = open(d / "log.txt", "wb")
        cmd = [sys.executable, "-m", "benchmarks.gpu.gate_stage", *lane_argv(argv, lane, d)]
        procs.append((lane, d, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        print(f"[lanes] lane{i}: {lane}", flush=True)

    def stop(signum: int, _frame: object) -> None:  # the part's `timeout`: end the lanes, still merge what they wrote
        print(f"[lanes] signal {signum}: ending the lanes", flush=True)
        for *_, q in procs:
            q.terminate()

    signal.signal(signal.SIGTERM, stop)
    rcs = []
    for i, (lane, d, log, p) in enumerate(procs):
        rcs.append(p.wait())
        log.close()
        print(f"[lanes] lane{i} ({lane}) exit {rcs[-1]} at {time.monotonic() - t0:.0f} s", flush=True)
    lines = merge_lanes(lanes, out, rcs)
    for x in lines:
        print(f"{x['gate']}: {x['verdict']} (lane {x['lane']}, {x.get('wall_s', '-')} s) {x.get('message', '')}",
              flush=True)
    return 0 if all(x["verdict"] == "passed" for x in lines) and not any(rcs) else 1


if __name__ == "__main__":
    sys.exit(main())
