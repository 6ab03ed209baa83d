"""Agreement report: the `torch` reference vs the `megatron` stacks, same case, through the probe contract.

    python -m benchmarks.agreement --model minicpm4-0.5b --seq-length 1024 --out DIR   # on one GPU

One case (random weights and tokens) is written twice, in bf16 and in fp32. Every probe (forward,
backward, steps) runs as a subprocess of `gates.stacks.STACKS`: `torch` on the fp32 case (the yardstick),
`torch` on the bf16 case, and each candidate stack on the bf16 case. Per tensor: the relative error
||a - b|| / ||b|| of candidate vs torch-bf16, of candidate vs torch-fp32, and of torch-bf16 vs torch-fp32
(what bf16 itself costs). A tensor agrees when the candidate is no further from fp32 than
`FACTOR` x torch-bf16's own distance (or `FLOOR[probe]`, whichever is larger): bf16 noise, not a bug.

bf16 alone cannot tell a small systematic difference from noise, and Adam makes noise grow: its first
step moves every weight by ~lr in the sign of its gradient, so elements whose bf16 gradients differ in
sign move apart by 2 lr. So each candidate also runs the probes named by `--fp32-probes` on the float32
case, judged against torch-fp32 with the fp32 gate bound (gates.policies: rel 2e-5): same math, only
summation order differs, so a real difference in the update rule (weight decay, bias correction, clipping,
the master-weight copy) shows there at >=1e-4 while rounding stays near 1e-6.
Writes DIR/agreement.json and DIR/agreement.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from gates.case import make_spec, new_case
from gates.model_config import load
from gates.policies import DTYPE_BOUNDS
from gates.probe import EXIT_UNSUPPORTED, TENSORS_FILE
from gates.stacks import STACKS

REPO = Path(__file__).resolve().parents[1]
PROBES = ("forward", "backward", "steps")
FACTOR = 3.0
FLOOR = {"forward": 1e-3, "backward": 1e-3, "steps": 1e-3}
FP32_REL = DTYPE_BOUNDS["float32"][0]  # the fp32 gates' norm-wise bound


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    den = torch.linalg.vector_norm(b)
    num = torch.linalg.vector_norm(a - b)
    return float(num / den) if den > 0 else float(num)


def run_probe(stack: str, probe: str, case: Path, out: Path, timeout: float) -> dict:
    """One probe of one stack through its CLI (what a gate runs); never raises for the stack's failures."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in [str(REPO), os.environ.get("PYTHONPATH")] if x))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([*STACKS[stack], "probe", probe, "--case", str(case), "--out", str(out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:  # subprocess.run has killed the child
        return {"stack": stack, "probe": probe, "status": "timeout", "message": f"no answer within {timeout:.0f} s",
                "wall_s": time.perf_counter() - t0}
    status = "ok" if proc.returncode == 0 else "unsupported" if proc.returncode == EXIT_UNSUPPORTED else "error"
    msg = (proc.stderr.strip().splitlines() or [""])[-1][:400] if status != "ok" else ""
    return {"stack": stack, "probe": probe, "status": status, "message": msg, "wall_s": time.perf_counter() - t0}


def run_reference_inprocess(probe: str, case: Path, out: Path) -> dict:
    """The `torch` stack's probe in this process (its CLI does exactly this; saves a process start per probe)."""
    from gates.case import load_case
    from gates.probe import write_outputs
    from gates.stacks.torch_ref.probes import run_probe as ref_probe

    t0 = time.perf_counter()
    try:
        tensors, metrics = ref_probe(probe, load_case(case), out)
        write_outputs(out, tensors, metrics)
        del tensors
        status, msg = "ok", ""
    except Exception as e:  # noqa: BLE001 - recorded: the candidates then have nothing to be compared with
        status, msg = "error", f"{type(e).__name__}: {str(e)[:300]}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"stack": "torch", "probe": probe, "status": status, "message": msg, "wall_s": time.perf_counter() - t0}


def compare_probe(cand: Path, ref16: Path, ref32: Path, probe: str) -> list[dict]:
    """One row per tensor name of the reference's output."""
    rows = []
    with safe_open(str(cand / TENSORS_FILE), "pt") as c, safe_open(str(ref16 / TENSORS_FILE), "pt") as r16, \
            safe_open(str(ref32 / TENSORS_FILE), "pt") as r32:
        missing = sorted(set(r16.keys()) - set(c.keys()))
        for name in missing:
            rows.append({"tensor": name, "agree": False, "error": "missing from the candidate's output"})
        for name in sorted(set(r16.keys()) & set(c.keys())):
            x, y16, y32 = c.get_tensor(name), r16.get_tensor(name), r32.get_tensor(name)
            e16, e32, noise = rel_err(x, y16), rel_err(x, y32), rel_err(y16, y32)
            bound = max(FACTOR * noise, FLOOR[probe])
            rows.append({"tensor": name, "vs_torch_bf16": e16, "vs_torch_fp32": e32, "torch_bf16_vs_fp32": noise,
                         "bound": bound, "agree": e32 <= bound})
    return rows


def compare_fp32(cand: Path, ref32: Path) -> list[dict]:
    """Candidate on the float32 case vs torch on the same case: one row per tensor, bound FP32_REL."""
    rows = []
    with safe_open(str(cand / TENSORS_FILE), "pt") as c, safe_open(str(ref32 / TENSORS_FILE), "pt") as r32:
        for name in sorted(set(r32.keys()) - set(c.keys())):
            rows.append({"tensor": name, "agree": False, "error": "missing from the candidate's output"})
        for name in sorted(set(r32.keys()) & set(c.keys())):
            e = rel_err(c.get_tensor(name), r32.get_tensor(name))
            rows.append({"tensor": name, "vs_torch_fp32": e, "bound": FP32_REL, "agree": e <= FP32_REL})
    return rows


def summarize(rows: list[dict]) -> dict:
    good = [r for r in rows if "vs_torch_fp32" in r]
    worst = max(good, key=lambda r: r["vs_torch_fp32"] / r["bound"], default=None)
    return {"tensors": len(rows), "agree": all(r["agree"] for r in rows) and bool(rows),
            "failing": [r["tensor"] for r in rows if not r["agree"]][:20],
            "max_vs_torch_bf16": max((r["vs_torch_bf16"] for r in good if "vs_torch_bf16" in r), default=None),
            "max_vs_torch_fp32": max((r["vs_torch_fp32"] for r in good), default=None),
            "worst": worst}


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"# Agreement: torch reference vs megatron stacks, {s['model']} (bf16)", "",
             f"Case: seq {s['seq_length']}, micro batch {s['micro_batch_size']} x grad accum {s['grad_accum']}, "
             f"{s['steps']} steps, seed {s['seed']}, device {s['device']}; {doc['created']}, commit {doc['git_commit'][:12]}.",
             f"Relative error ||a-b||/||b||. A tensor agrees when candidate-vs-fp32 <= max({FACTOR} x torch-bf16-vs-fp32, floor).",
             f"Rows `PROBE@fp32`: the candidate on the float32 case vs torch on it, bound {FP32_REL:g} (the fp32 gates').",
             ""]
    for stack, res in doc["stacks"].items():
        lines += [f"## {stack}", "", "| probe | status | tensors | agree | max vs torch-bf16 | max vs torch-fp32 | worst tensor (vs fp32 / bound) |",
                  "|---|---|---|---|---|---|---|"]
        for probe, pr in res.items():
            sm = pr.get("summary")
            if not sm:
                lines.append(f"| {probe} | {pr['status']} | — | — | — | — | {pr.get('message', '')} |")
                continue
            w = sm["worst"]
            vs16 = "— (fp32 case)" if probe.endswith("@fp32") else f"{sm['max_vs_torch_bf16']:.2e}"
            lines.append(f"| {probe} | {pr['status']} | {sm['tensors']} | {'yes' if sm['agree'] else 'NO'} | "
                         f"{vs16} | {sm['max_vs_torch_fp32']:.2e} | "
                         f"{w['tensor']} ({w['vs_torch_fp32']:.2e} / {w['bound']:.2e}) |")
        fwd = res.get("forward", {}).get("rows") or []
        layers = [r for r in fwd if r["tensor"].startswith("hidden_states.")]
        if layers:
            layers.sort(key=lambda r: int(r["tensor"].split(".")[1]))
            lines += ["", "Per layer (residual stream), relative error vs torch-bf16 / vs torch-fp32 / torch-bf16 vs fp32:", "",
                      "| layer | vs bf16 | vs fp32 | bf16 noise |", "|---|---|---|---|"]
            lines += [f"| {r['tensor'].split('.')[1]} | {r['vs_torch_bf16']:.2e} | {r['vs_torch_fp32']:.2e} | "
                      f"{r['torch_bf16_vs_fp32']:.2e} |" for r in layers]
        lines.append("")
    lines.append(f"Overall: {'AGREE' if doc['agree'] else 'DISAGREE'} within bf16 tolerance.")
    return "\n".join(lines) + "\n"


def write_report(doc: dict, out: Path) -> None:
    doc["agree"] = bool(doc["stacks"]) and all(pr.get("summary", {}).get("agree", False)
                                              for res in doc["stacks"].values() for pr in res.values())
    (out / "agreement.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "agreement.md").write_text(markdown(doc))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agreement", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minicpm4-0.5b")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--stacks", default="megatron,megatron-sdpa", help="candidate stacks (names in gates.stacks.STACKS)")
    p.add_argument("--probes", default=",".join(PROBES))
    p.add_argument("--fp32-probes", default="steps",
                   help="probes each candidate also runs on the float32 case (vs torch-fp32, fp32 bound); '' for none")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per probe run")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole report; probes past it are skipped")
    p.add_argument("--reference-subprocess", action="store_true",
                   help="run the torch reference through its CLI too (default: in this process, same code)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cfg = load(args.model)
    out = args.out
    common = dict(steps=args.steps, micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum,
                  seq_length=args.seq_length, device=args.device, seed=args.seed)
    cases = {dt_: new_case(out / "cases" / dt_, make_spec(cfg, dtype=dt_, **common)) for dt_ in ("bfloat16", "float32")}
    probes = [x for x in args.probes.split(",") if x]
    runs: list[dict] = []
    doc: dict = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "git_commit": os.environ.get("FORGE_GIT_COMMIT") or "unknown",
                 "settings": {"model": cfg.name, **common, "stacks": args.stacks, "factor": FACTOR, "floor": FLOOR},
                 "torch": torch.__version__, "stacks": {}, "runs": runs}
    deadline = None if args.budget is None else time.monotonic() + args.budget

    def left() -> float:
        return args.timeout if deadline is None else min(args.timeout, deadline - time.monotonic())

    fp32_probes = [x for x in args.fp32_probes.split(",") if x]
    ref_jobs = [(probe, label, case) for probe in probes for label, case in [("torch-fp32", "float32"), ("torch-bf16", "bfloat16")]]
    ref_jobs += [(probe, "torch-fp32", "float32") for probe in fp32_probes if probe not in probes]
    for probe, label, case in ref_jobs:
        where = out / "probes" / label / probe
        if args.reference_subprocess:
            r = run_probe("torch", probe, cases[case], where, left())
        else:
            r = run_reference_inprocess(probe, cases[case], where)
        runs.append(r | {"label": label})
    ok = {(r["label"], r["probe"]) for r in runs if r["status"] == "ok"}
    for stack in [s for s in args.stacks.split(",") if s]:
        res = doc["stacks"][stack] = {}
        for probe in probes:
            if left() < 20:
                res[probe] = {"status": "skipped", "message": "report budget (--budget) spent"}
                continue
            r = run_probe(stack, probe, cases["bfloat16"], out / "probes" / stack / probe, left())
            runs.append(r | {"label": stack})
            res[probe] = {"status": r["status"], "message": r["message"]}
            if r["status"] == "ok" and not {("torch-fp32", probe), ("torch-bf16", probe)} <= ok:
                res[probe]["message"] = "the torch reference failed on this probe: nothing to compare with"
            if r["status"] == "ok" and {("torch-fp32", probe), ("torch-bf16", probe)} <= ok:
                rows = compare_probe(out / "probes" / stack / probe, out / "probes" / "torch-bf16" / probe,
                                     out / "probes" / "torch-fp32" / probe, probe)
                res[probe] |= {"summary": summarize(rows), "rows": rows}
            print(f"[agreement] {stack} {probe}: {r['status']}"
                  + (f", agree={res[probe]['summary']['agree']}" if "summary" in res[probe] else f" {r['message']}"),
                  file=sys.stderr, flush=True)
            write_report(doc, out)  # after every probe: a run cut short still leaves its report
        for probe in fp32_probes:
            key = f"{probe}@fp32"
            if left() < 20:
                res[key] = {"status": "skipped", "message": "report budget (--budget) spent"}
                continue
            where = out / "probes" / stack / key
            r = run_probe(stack, probe, cases["float32"], where, left())
            runs.append(r | {"label": f"{stack} fp32"})
            res[key] = {"status": r["status"], "message": r["message"]}
            if r["status"] == "ok" and ("torch-fp32", probe) in ok:
                rows = compare_fp32(where, out / "probes" / "torch-fp32" / probe)
                res[key] |= {"summary": summarize(rows), "rows": rows}
            elif r["status"] == "ok":
                res[key]["message"] = "the torch reference failed on this probe: nothing to compare with"
            print(f"[agreement] {stack} {key}: {r['status']}"
                  + (f", agree={res[key]['summary']['agree']}" if "summary" in res[key] else f" {r['message']}"),
                  file=sys.stderr, flush=True)
            write_report(doc, out)
    write_report(doc, out)
    print(markdown(doc))
    return 0 if doc["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
