"""FA4's persistent kernel cache across processes: the engine's flash4 op at the step's shape, run in two fresh
processes sharing one cache directory, with deterministic algorithms on (FA4's default backward accumulates dq
with atomics, so only its deterministic kernel repeats bitwise). The second must load the kernels (shorter first
call) and give bitwise the same outputs and gradients as the first.

    python3 benchmarks/gpu/fa4_cache_check.py --out DIR     (exit 0: cache works; 1: it does not)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(result: Path) -> None:
    import torch

    from train_engine_0_5b.ops.attention import flash4

    if flash4.UNAVAILABLE_REASON:
        raise SystemExit(f"flash4 unavailable: {flash4.UNAVAILABLE_REASON}")
    torch.use_deterministic_algorithms(True)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(8, 4096, 16, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k = torch.randn(8, 4096, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    v = torch.randn(8, 4096, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    t0 = time.perf_counter()
    o = flash4.attention(q, k, v)
    o.float().square().mean().backward()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    torch.save({"o": o.detach().cpu(), "dq": q.grad.cpu(), "dk": k.grad.cpu(), "dv": v.grad.cpu(),
                "first_call_s": first_s}, result)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--child", type=Path, default=None)
    a = ap.parse_args()
    if a.child is not None:
        child(a.child)
        return 0
    import torch

    a.out.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="fa4-cache-"))
    env = {**os.environ, "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(cache)}
    env.pop("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", None)  # the engine's default decides
    runs = []
    for i in (1, 2):
        res = a.out / f"run{i}.pt"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--out", str(a.out), "--child", str(res)], env=env,
                           capture_output=True, text=True)
        runs.append({"exit": p.returncode, "process_s": round(time.perf_counter() - t0, 2),
                     "stderr_tail": p.stderr[-1500:]})
        if p.returncode:
            break
    ok = all(r["exit"] == 0 for r in runs) and len(runs) == 2
    summary: dict = {"runs": runs, "cache_files": sum(1 for f in cache.rglob("*") if f.is_file())}
    if ok:
        r1, r2 = (torch.load(a.out / f"run{i}.pt") for i in (1, 2))
        summary["first_call_s"] = [r1["first_call_s"], r2["first_call_s"]]
        summary["bitwise_equal"] = {n: bool(torch.equal(r1[n], r2[n])) for n in ("o", "dq", "dk", "dv")}
        ok = all(summary["bitwise_equal"].values()) and summary["cache_files"] > 0
        for i in (1, 2):
            (a.out / f"run{i}.pt").unlink()
    summary["cache_works"] = ok
    (a.out / "fa4_cache_check.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}), [r["exit"] for r in runs])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
