"""Which SwiGLU MLP for MiniCPM4-0.5B on this GPU: the unfused reference (eager and torch.compile'd, i.e.
cuBLAS GEMMs + Inductor's fused SwiGLU kernels) against ops/mlp/quack_gated.py (quack's fc1 GEMM with SwiGLU
in its epilogue; backward in torch), eager and torch.compile'd, at the production shape (B x 4096 tokens,
h 1024, f 4096, bf16).

    python exports/train_engine_0.5B/scripts/gpu_mlp.py --out DIR [--batch 8]

Per variant: forward and forward+backward time (triton.testing.do_bench median), TFLOP/s (forward: three
GEMMs, 6*M*h*f FLOP; forward+backward 3x that), the first calls' time (compiling, tuning), and the relative
error of y, dx, dgate, dup, ddown against an fp64 reference on a 1 x 1024 slice. DIR/mlp.json is rewritten
after every variant (a slow autotune cut off by a timeout keeps the rows before it); a table is printed.
A variant that cannot run records its error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ENGINE / "src"))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from train_engine_0_5b.ops.mlp import quack_gated, reference  # noqa: E402

H, F = 1024, 4096


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    a = p.parse_args()
    M = a.batch * a.seq
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=gen) * scale).bfloat16()  # noqa: E731
    x = mk(a.batch, a.seq, H).requires_grad_()
    ws = [mk(F, H, scale=H**-0.5).requires_grad_(), mk(F, H, scale=H**-0.5).requires_grad_(),
          mk(H, F, scale=F**-0.5).requires_grad_()]
    dy = mk(a.batch, a.seq, H)
    sl = min(a.seq, 1024)
    args64 = [x[:1, :sl].detach().double().requires_grad_()] + [w.detach().double().requires_grad_() for w in ws]
    want = [reference.mlp(*args64)]
    want += torch.autograd.grad(want[0], args64, dy[:1, :sl].double())
    variants = {"unfused-eager": reference.mlp, "unfused-compiled": torch.compile(reference.mlp),
                "quack_gated-eager": quack_gated.mlp, "quack_gated-compiled": torch.compile(quack_gated.mlp)}
    fwd_flop = 6 * M * H * F
    rows: dict[str, dict] = {}
    for name, fn in variants.items():
        try:
            small = [x[:1, :sl].detach().clone().requires_grad_()] + [w.detach().clone().requires_grad_() for w in ws]
            t0 = time.perf_counter()
            got = [fn(*small)]
            got += torch.autograd.grad(got[0], small, dy[:1, :sl])
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            errs = {f"rel_err_{n}": rel(g, w) for n, g, w in zip(("y", "dx", "dgate", "dup", "ddown"), got, want)}
            t0 = time.perf_counter()
            fn(x, *ws).backward(dy)  # the production shape's first call (compile / tune)
            torch.cuda.synchronize()
            first_s += time.perf_counter() - t0
            fwd_ms = do_bench(lambda: fn(x, *ws), warmup=10, rep=100, return_mode="median")

            def fb():
                for t in (x, *ws):
                    t.grad = None
                fn(x, *ws).backward(dy)
            fb_ms = do_bench(fb, warmup=10, rep=100, return_mode="median")
            rows[name] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "fwd_tflops": fwd_flop / fwd_ms / 1e9,
                          "fwd_bwd_tflops": 3 * fwd_flop / fb_ms / 1e9, "first_calls_s": first_s, **errs}
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is a result
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, json.dumps(rows[name]), flush=True)
        doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "shape": {"batch": a.batch, "seq": a.seq, "hidden": H, "ffn": F, "dtype": "bfloat16"},
               "quack_unavailable": quack_gated.UNAVAILABLE_REASON, "rows": rows}
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "mlp.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'variant':24} {'fwd ms':>8} {'f+b ms':>8} {'f+b TF/s':>9} {'err y':>9} {'err dx':>9} {'first s':>8}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:24} {r['error'][:80]}")
        else:
            print(f"{name:24} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_tflops']:9.1f} "
                  f"{r['rel_err_y']:9.2e} {r['rel_err_dx']:9.2e} {r['first_calls_s']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
