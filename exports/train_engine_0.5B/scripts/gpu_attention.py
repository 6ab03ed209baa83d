"""Which attention for MiniCPM4-0.5B on this GPU: every implementation the registry offers, plus each SDPA
backend forced, at the production shape (B x 4096 tokens, 16 q / 2 kv heads, d 64, causal, bf16).

    python exports/train_engine_0.5B/scripts/gpu_attention.py --out DIR [--batch 8]

Per implementation: forward and forward+backward time (triton.testing.do_bench median), TFLOP/s (causal
forward = 2 * B * n * S^2 * d; backward counted 2.5 x forward), and the relative error ||x - ref|| / ||ref||
of o, dq, dk, dv against a float64 reference (reference.py in fp64) on a 1 x 1024 slice. Writes
DIR/attention.json and prints a table. An implementation that cannot run records its error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ENGINE / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from train_engine_0_5b.ops.attention import reference  # noqa: E402
from train_engine_0_5b.ops.registry import OPS, UNAVAILABLE  # noqa: E402

N, G, D = 16, 2, 64


def forced_sdpa(backend: SDPBackend):
    def attention(q, k, v):
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)
        return o.transpose(1, 2)
    return attention


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    a = p.parse_args()
    B, S = a.batch, a.seq
    impls = {f"registry:{k}": fn for k, fn in OPS["attention"].items() if k != "reference"}
    impls |= {f"sdpa-forced:{n}": forced_sdpa(b) for n, b in
              [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
               ("efficient", SDPBackend.EFFICIENT_ATTENTION)]}
    gen = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k, v, do = mk(B, S, N, D).requires_grad_(), mk(B, S, G, D).requires_grad_(), mk(B, S, G, D).requires_grad_(), mk(B, S, N, D)
    sl = min(S, 1024)
    qs, ks, vs = (t[:1, :sl].detach().double().requires_grad_() for t in (q, k, v))
    want = [reference.attention(qs, ks, vs)]
    want += torch.autograd.grad(want[0], (qs, ks, vs), do[:1, :sl].double())
    fwd_flop = 2 * B * N * S * S * D
    rows: dict[str, dict] = {}
    for name, fn in impls.items():
        try:
            x = [t[:1, :sl].detach().clone().requires_grad_() for t in (q, k, v)]
            got = [fn(*x)]
            got += torch.autograd.grad(got[0], x, do[:1, :sl])
            errs = {f"rel_err_{n}": rel(g, w) for n, g, w in zip(("o", "dq", "dk", "dv"), got, want)}
            fwd_ms = do_bench(lambda: fn(q, k, v), warmup=25, rep=200, return_mode="median")

            def fb():
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(do)
            fb_ms = do_bench(fb, warmup=25, rep=200, return_mode="median")
            rows[name] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "fwd_tflops": fwd_flop / fwd_ms / 1e9,
                          "fwd_bwd_tflops": 3.5 * fwd_flop / fb_ms / 1e9, **errs}
        except Exception as e:  # noqa: BLE001 - an implementation that cannot run is a result
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, json.dumps(rows[name]), flush=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
           "shape": {"batch": B, "seq": S, "q_heads": N, "kv_heads": G, "head_dim": D, "dtype": "bfloat16"},
           "unavailable": {f"{o}:{i}": r for (o, i), r in UNAVAILABLE.items() if o == "attention"}, "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "attention.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'implementation':24} {'fwd TF/s':>9} {'f+b TF/s':>9} {'err o':>9} {'err dq':>9}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:24} {r['error'][:80]}")
        else:
            print(f"{name:24} {r['fwd_tflops']:9.1f} {r['fwd_bwd_tflops']:9.1f} {r['rel_err_o']:9.2e} {r['rel_err_dq']:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
