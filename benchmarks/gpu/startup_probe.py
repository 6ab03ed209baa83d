"""Where `pretrain`'s one-time costs go, run by run, and how much two runs of the same command differ outside
their steps.

Each run is one `pretrain` process of the 0.5B at its defaults on random token batches (no --init-from).
This script stamps, on its own clock: the launch, every stdout line, every JSONL log line as it appears,
and the exit; and reads the kernel's dirty / writeback page counts before each run. Then it deletes the
run's checkpoint (timed apart), as the gate does. Usage (GPU machine, after session.sh's set-up):
    python3 benchmarks/gpu/startup_probe.py --out DIR --runs warm:10 N:100 2N:200 N:100:nosave 2N:200:nosave
RUN is NAME:STEPS[:nosave]. Writes DIR/startup_probe.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE_SRC = REPO / "exports" / "train_engine_0.5B" / "src"
sys.path.insert(0, str(REPO))  # run as a script: the gates' line clock and log reader

from gates.line_clock import LineClock  # noqa: E402
from gates.pretrain_runs import logged_step_times  # noqa: E402


def meminfo() -> dict[str, int]:
    """Dirty and Writeback page totals in kB (what a checkpoint written just before leaves behind)."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Dirty", "Writeback", "MemFree", "Cached"):
            out[key] = int(rest.split()[0])
    return out


def run_one(name: str, steps: int, save: bool, work: Path, batches: Path, a: argparse.Namespace) -> dict:
    log, save_dir = work / f"{name}.jsonl", work / f"save-{name}"
    log.unlink(missing_ok=True)
    shutil.rmtree(save_dir, ignore_errors=True)
    argv = [sys.executable, "-m", "train_engine_0_5b", "pretrain", "--model", a.model, "--token-batches", str(batches),
            "--num-steps", str(steps), "--global-batch-size", str(a.global_batch), "--micro-batch-size", str(a.micro_batch),
            "--seq-length", str(a.seq), "--lr", "3e-4", "--min-lr", "3e-4", "--lr-schedule", "constant",
            "--warmup-steps", "2", "--seed", "7", "--log-file", str(log)] + (["--save-dir", str(save_dir)] if save else [])
    env = dict(os.environ, PYTHONPATH=f"{ENGINE_SRC}:{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    before = meminfo()
    out_lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with LineClock(log) as clock:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out_lines.append((time.monotonic() - t0, line.rstrip()[:300]))
        rc = proc.wait(timeout=a.timeout_s)
        wall = time.monotonic() - t0
    after = meminfo()
    t = time.monotonic()
    shutil.rmtree(save_dir, ignore_errors=True)
    rm_s = time.monotonic() - t
    arrivals = [(step, round(when - t0, 4)) for step, when in sorted(clock.stamps.items())]
    engine_times = logged_step_times(log)
    return {"name": name, "steps": steps, "save": save, "rc": rc, "wall_s": round(wall, 3), "rmtree_s": round(rm_s, 3),
            "meminfo_before_kb": before, "meminfo_after_kb": after, "log_arrivals": arrivals,
            "engine_step_times_s": engine_times, "stdout": out_lines[-60:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", nargs="+", required=True, help="NAME:STEPS[:nosave] ...")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--model", default="minicpm4-0.5b", help="the engine's preset (tiny: a CPU check of this script)")
    p.add_argument("--timeout-s", type=float, default=300)
    a = p.parse_args()
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ENGINE_SRC))
    from train_engine_0_5b.model_config import preset
    vocab = preset(a.model).vocab_size

    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / "work"
    work.mkdir(exist_ok=True)
    runs = [(r.split(":")[0], int(r.split(":")[1]), not r.endswith(":nosave")) for r in a.runs]
    most = max(s for _, s, _ in runs)
    ids = torch.randint(0, vocab, (most, a.global_batch, a.seq), generator=torch.Generator().manual_seed(0))
    batches = work / "batches.safetensors"
    save_file({"input_ids": ids, "labels": ids.roll(-1, dims=-1)}, str(batches))
    results = []
    for name, steps, save in runs:
        r = run_one(name, steps, save, work, batches, a)
        results.append(r)
        arr = dict(r["log_arrivals"])
        first = arr.get(1)
        last = arr.get(steps)
        print(f"{name:8} steps {steps:4} save {save!s:5} rc {r['rc']} wall {r['wall_s']:7.2f}s  line1 {first}  "
              f"line{steps} {last}  exit-last {None if last is None else round(r['wall_s'] - last, 2)}  "
              f"engine sum {sum(r['engine_step_times_s']):.2f}  rmtree {r['rmtree_s']}s  "
              f"dirty/wb before {r['meminfo_before_kb']['Dirty'] // 1024}/{r['meminfo_before_kb']['Writeback'] // 1024} MB",
              flush=True)
        (a.out / "startup_probe.json").write_text(json.dumps({"runs": results, "args": vars(a) | {"out": str(a.out)}},
                                                             indent=1, default=str))
    (work / "batches.safetensors").unlink()


if __name__ == "__main__":
    main()
