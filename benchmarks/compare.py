"""The side-by-side benchmark driver: every stack's training steps, one after the other, each in its own
subprocess (no memory or compile cache leaks between stacks), same random tokens and shapes, one GPU.

    python -m benchmarks.compare --model minicpm4-0.5b --seq-length 4096 --micro-batch-size 8 --steps 8 --out DIR
    python -m benchmarks.compare --dry-run            # print the plan, run nothing
    python -m benchmarks.compare --smoke --out DIR    # CPU, tiny preset: eager + compile, a few steps

Per stack: tokens/s, median step time, MFU (benchmarks/metrics.py), peak memory, and ratios to
megatron-core(-sdpa) and torch.compile. Each engine gets two rows: its own `bench` (self-reported) and its
`pretrain` at its defaults timed by the gates (benchmarks/gate_timed.py); only the second is a figure to quote. Out of memory is a result; with `--oom-fallback` (default) the
stack is retried at half the micro batch down to 1, and each attempt is recorded. Writes
DIR/compare.json + DIR/compare.md; only with --record (or --results-dir) a copy as
<results-dir>/<date>-<device>-<model>.json|md, added to the results index (benchmarks/results_index.py) when the
folder has one. `--smoke` (CPU, tiny preset) runs the reference stacks and every engine on tiny shapes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from benchmarks import results_index
from benchmarks.gate_timed import gate_timed_row
from benchmarks.metrics import PEAK_TFLOPS_BF16, mfu, ratio
from benchmarks.report import BASELINES, markdown
from benchmarks.stacks import DEFAULT_STACKS, REPO, Stack, engine_model, resolve
from gates.model_config import load, to_hf_minicpm_config

RESULTS_DIR = results_index.RESULTS_DIR

DEFAULT_STACK_MBS = {"megatron": 1}  # unfused attention: micro batch 2 ran out of memory at seq 4096 (MEASURED.md)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--model", default="minicpm4-0.5b", help="preset, model .toml or HF config.json (default: %(default)s)")
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per row (default: %(default)s)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="rows per step of every stack (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per stack first (default: %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="measured steps per stack, after warm-up (default: %(default)s)")
    p.add_argument("--stacks", default=",".join(DEFAULT_STACKS),
                   help="comma list: megatron, megatron-sdpa, torch-eager, torch-compile, torchtitan, engines, engine:DIR")
    p.add_argument("--stack-mbs", action="append", default=[], metavar="STACK=M",
                   help="micro batch for one stack (default: megatron=1, the unfused attention's largest that fits)")
    p.add_argument("--oom-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="after out of memory, retry the stack at half the micro batch (down to 1)")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds per stack attempt (default: %(default)s)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run: attempts get at most what is left; stacks past it are recorded as skipped")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and random tokens (default: %(default)s)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of torch-compile (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/bench-<time>)")
    p.add_argument("--record", action="store_true",
                   help="also copy the result into --results-dir and add it to that folder's index.jsonl")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="where --record copies the result (default: benchmarks/results); giving it implies --record")
    p.add_argument("--dry-run", action="store_true", help="print the plan as JSON and run nothing")
    p.add_argument("--gate-timed", action=argparse.BooleanOptionalAction, default=True,
                   help="beside each engine's own bench row, its pretrain at its defaults timed by the gates (M5's speed part)")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="rows per step of the gate-timed pretrain (default: the micro batch, no accumulation)")
    p.add_argument("--cpu-peak-tflops", type=float, default=None,
                   help="tests only: a CPU peak so the gate-timed row runs on a CPU (GPU peaks are the gates' own)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run (about a minute): tiny preset, seq 64, micro batch 2, 1 + 2 steps; eager, "
                        "compile (aot_eager) and every engine's bench, no gate-timed rows")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.smoke:
        args.model, args.seq_length, args.micro_batch_size, args.warmup, args.steps = "tiny", 64, 2, 1, 2
        args.device, args.compile_backend, args.stacks = "cpu", "aot_eager", "torch-eager,torch-compile,engines"
        args.gate_timed = False
    args.record = args.record or args.results_dir is not None
    args.results_dir = args.results_dir or RESULTS_DIR
    return args


def stack_mbs(args: argparse.Namespace) -> dict[str, int]:
    out = dict(DEFAULT_STACK_MBS)
    for item in args.stack_mbs:
        name, _, m = item.partition("=")
        if not m.isdigit() or int(m) < 1:
            raise SystemExit(f"--stack-mbs {item!r}: expected STACK=M with M >= 1")
        out[name] = int(m)
    return out


def _model_config(stack: Stack, args: argparse.Namespace, result: Path) -> Path | None:
    """The config.json an engine's bench reads (`--model`) when the compared model is not its own; None: its own
    model (or tiny). Written by run_attempt, beside the run's raw results."""
    if args.model == "tiny" or stack.engine_dir is None or engine_model(stack.engine_dir) == args.model:
        return None
    return result.parent.parent / "models" / args.model / "config.json"


def _write_model_config(model: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_hf_minicpm_config(load(model)), indent=2) + "\n")


def command(stack: Stack, args: argparse.Namespace, mbs: int, result: Path) -> list[str]:
    if stack.engine_contract:
        cmd = [*stack.argv, "--seq-length", str(args.seq_length), "--micro-batch-size", str(mbs),
               "--steps", str(args.steps), "--json", str(result)]
        if args.model == "tiny":  # the tiny preset of the engine's own math (as the gates' CPU cases)
            cmd += ["--model", "tiny", "--device", args.device, "--warmup", str(args.warmup)]
        elif (model_config := _model_config(stack, args, result)) is not None:
            cmd += ["--model", str(model_config)]
        return cmd
    cmd = [*stack.argv, "--model", args.model, "--seq-length", str(args.seq_length), "--micro-batch-size", str(mbs),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device, "--seed", str(args.seed),
           "--json", str(result)]
    if stack.name == "torch-compile":
        cmd += ["--compile-backend", args.compile_backend]
    return cmd


def run_attempt(stack: Stack, args: argparse.Namespace, mbs: int, out: Path, timeout: float) -> dict:
    """One subprocess; its result file, or a result made from its exit and log."""
    tag = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stack.name)}-mb{mbs}"
    result, log = out / "raw" / f"{tag}.json", out / "logs" / f"{tag}.log"
    result.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    if stack.engine_contract and (model_config := _model_config(stack, args, result)) is not None:
        _write_model_config(args.model, model_config)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(x for x in [stack.env.get("PYTHONPATH"), str(REPO), os.environ.get("PYTHONPATH")] if x)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(command(stack, args, mbs, result), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we started: the runner and its compile workers
            proc.wait()
            rc = None
    wall = time.perf_counter() - t0
    tail = log.read_text(errors="replace")[-1500:]
    if rc is None:
        r = {"status": "timeout", "message": f"no result within {timeout:.0f} s"}
    elif result.is_file():
        r = json.loads(result.read_text())
        r.setdefault("status", "ok" if rc == 0 else "error")
    elif stack.engine_contract and rc == 2:
        r = {"status": "unsupported", "message": "engine has no `bench` command yet (exit 2)"}
    elif rc == 77:
        r = {"status": "unsupported", "message": tail.strip().splitlines()[-1] if tail.strip() else "exit 77"}
    else:
        oom = "out of memory" in tail.lower()
        r = {"status": "oom" if oom else "error", "message": f"exit {rc}: " + (tail.strip().splitlines() or [""])[-1][:400]}
    r |= {"micro_batch_size": mbs, "wall_s": wall, "log": str(log.relative_to(out)), "exit_code": rc}
    return r


def run_stack(stack: Stack, args: argparse.Namespace, mbs: int, out: Path, flops_per_token: float,
              deadline: float | None = None) -> dict:
    row: dict = {"stack": stack.name, "kind": stack.kind, "note": stack.note, "attempts": []}
    if stack.argv is None:
        return row | {"status": "unsupported" if stack.kind != "engine" else "skipped", "message": stack.skip_reason}
    while True:
        timeout = args.timeout if deadline is None else min(args.timeout, deadline - time.monotonic())
        if timeout < 20:
            return row | {"status": "skipped", "message": "run budget (--budget) spent before this stack", "micro_batch_size": mbs}
        print(f"[compare] {stack.name} micro batch {mbs}: running (log: {out / 'logs'})", file=sys.stderr, flush=True)
        r = run_attempt(stack, args, mbs, out, timeout)
        row["attempts"].append({k: r.get(k) for k in ("micro_batch_size", "status", "message", "wall_s")})
        print(f"[compare] {stack.name} micro batch {mbs}: {r['status']} in {r['wall_s']:.0f} s"
              + (f", {tokens_per_s(r['tokens_per_s'])} tokens/s" if r["status"] == "ok" else f" ({r.get('message', '')})"),
              file=sys.stderr, flush=True)
        if r["status"] == "oom" and args.oom_fallback and mbs > 1:
            mbs //= 2
            continue
        break
    keep = ("status", "message", "micro_batch_size", "tokens_per_s", "step_time_s", "peak_mem_gib", "step_times_s",
            "losses", "settings", "device_name", "torch", "megatron_core", "wall_s", "log")
    row |= {k: r[k] for k in keep if k in r}
    if r["status"] == "ok":
        if stack.engine_contract and "mfu" in r:
            row["reported_mfu"] = r["mfu"]
        row["mfu"] = row_mfu(row["tokens_per_s"], flops_per_token, args)  # one formula for every stack
    return row


def row_mfu(tokens_per_s: float, flops_per_token: float, args: argparse.Namespace) -> float | None:
    """MFU against the GPU's peak; on a CPU only against the peak given (--cpu-peak-tflops), else None."""
    peak = PEAK_TFLOPS_BF16 if args.device == "cuda" else args.cpu_peak_tflops
    return None if peak is None else mfu(tokens_per_s, flops_per_token, peak_tflops=peak)


def tokens_per_s(x: float) -> str:
    """Thousands separators for GPU figures, three significant digits for CPU ones (never "1 tokens/s")."""
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def add_ratios(rows: list[dict]) -> None:
    ok = {r["stack"]: r["tokens_per_s"] for r in rows if r["status"] == "ok"}
    for r in rows:
        r["vs"] = {b: ratio(r.get("tokens_per_s") if r["status"] == "ok" else None, ok.get(b)) for b in BASELINES}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*cmd: str) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(rows: list[dict], device: str) -> dict:
    names = [r["device_name"] for r in rows if r.get("device_name")]
    hw = {"device": device, "host": platform.node(), "cpu": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "gpus_used": 1 if device == "cuda" else 0}
    if names:
        hw["device_name"] = names[0]
    elif device == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True) \
            if any((Path(p) / "nvidia-smi").exists() for p in os.environ.get("PATH", "").split(os.pathsep)) else None
        hw["device_name"] = smi.stdout.strip().splitlines()[0] if smi and smi.stdout.strip() else "unknown GPU"
    else:
        hw["device_name"] = "cpu"
    return hw


def device_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name.upper())
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load(args.model)
    flops = cfg.flops_per_token(args.seq_length)
    per_mbs = stack_mbs(args)
    stacks = resolve([s.strip() for s in args.stacks.split(",") if s.strip()], cfg.name)
    plan = [{"stack": s.name, "micro_batch_size": per_mbs.get(s.name, args.micro_batch_size),
             "command": command(s, args, per_mbs.get(s.name, args.micro_batch_size), Path("RESULT.json")) if s.argv else None,
             "skip_reason": s.skip_reason} for s in stacks]
    if args.dry_run:
        print(json.dumps({"model": cfg.name, "seq_length": args.seq_length, "flops_per_token": flops, "plan": plan}, indent=2))
        return 0
    out = args.out or REPO / "runs" / f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    deadline = None if args.budget is None else time.monotonic() + args.budget
    rows = []
    for s in stacks:
        mbs = per_mbs.get(s.name, args.micro_batch_size)
        rows.append(run_stack(s, args, mbs, out, flops, deadline))
        if s.engine_dir is not None and s.argv is not None and args.gate_timed:
            row = gate_timed_row(s, args, mbs, out, deadline)
            if row["status"] == "ok":
                row["mfu"] = row_mfu(row["tokens_per_s"], flops, args)
            rows.append(row)
    add_ratios(rows)
    given = os.environ.get("FORGE_GIT_COMMIT")  # a device copy of the tree: its own git state says nothing
    commit = given or _git("rev-parse", "HEAD") or "unknown"
    doc = {
        "schema": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if given else bool(_git("status", "--porcelain", "--untracked-files=no")),
        "hardware": hardware(rows, args.device),
        "versions": {"python": platform.python_version(), "torch": _version("torch"), "triton": _version("triton"),
                     "megatron_core": _version("megatron-core"), "transformer_engine": _version("transformer-engine")},
        "settings": {"model": cfg.name, "model_config": cfg.model_dump(), "seq_length": args.seq_length,
                     "micro_batch_size": args.micro_batch_size, "stack_micro_batch_size": per_mbs,
                     "warmup": args.warmup, "steps": args.steps, "seed": args.seed, "device": args.device,
                     "stacks": [s.name for s in stacks], "oom_fallback": args.oom_fallback, "timeout_s": args.timeout,
                     "budget_s": args.budget, "compile_backend": args.compile_backend, "flops_per_token": flops, "peak_tflops": PEAK_TFLOPS_BF16,
                     "mfu_formula": "6*(L*(2*h*n*d + 2*h*g*d + 3*h*f + s*n*d) + h*V) per token / peak",
                     "gpus": 1},
        "results": rows,
    }
    text, md = json.dumps(doc, indent=2) + "\n", markdown(doc)
    (out / "compare.json").write_text(text)
    (out / "compare.md").write_text(md)
    print(md)
    print(f"[compare] written: {out / 'compare.json'}, {out / 'compare.md'}", file=sys.stderr)
    if args.record:
        stem = f"{dt.date.today():%Y-%m-%d}-{device_slug(doc['hardware']['device_name'])}-{cfg.name}"
        try:
            paths = record(args.results_dir, stem, text, md, what=f"side-by-side {cfg.name}, seq {args.seq_length}, "
                           f"micro batch {args.micro_batch_size}: {', '.join(s.name for s in stacks)}")
        except ValueError as e:
            print(f"[compare] not recorded: {e}", file=sys.stderr)
            return 1
        print(f"[compare] recorded: {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


def record(results_dir: Path, stem: str, text: str, md: str, *, what: str) -> list[Path]:
    """Copy a comparison into results_dir as <stem>[-N].json|md; where the folder keeps an index (the repo's
    benchmarks/results), add the entry too, and take the files back out if the index refuses them."""
    results_dir.mkdir(parents=True, exist_ok=True)
    n, base = 1, stem
    while (results_dir / f"{stem}.json").exists() or (results_dir / f"{stem}.md").exists():
        n += 1
        stem = f"{base}-{n}"
    paths = [results_dir / f"{stem}.json", results_dir / f"{stem}.md"]
    paths[0].write_text(text)
    paths[1].write_text(md)
    if (results_dir / results_index.INDEX_FILE).is_file():
        try:
            entry = results_index.describe([p.name for p in paths], kind="compare", what=what, root=results_dir)
            results_index.add_entry(entry, root=results_dir)
        except (ValueError, ValidationError) as e:  # an unknown device name, a clash: nothing half-recorded
            for p in paths:
                p.unlink(missing_ok=True)
            raise ValueError(f"{results_dir / results_index.INDEX_FILE} refused {stem}: {e}") from None
    return paths


if __name__ == "__main__":
    sys.exit(main())
