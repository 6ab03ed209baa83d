"""Weight-gradient GEMMs of the MiniCPM4-0.5B step with a bf16 output (what autograd runs) and an fp32 one
(torch.addmm(out_dtype=float32), as a gradient-accumulation fusion would write into fp32 main grads).

    python benchmarks/gpu/wgrad_out_dtype.py [--out DIR]

dW (out, in) = dY^T (out, T) @ X (T, in) at T = 8 x 4096 tokens, bf16 inputs, one GPU; do_bench medians.
Writes DIR/wgrad_out_dtype.json (default $OUT) and prints one line per shape.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton

T = 8 * 4096
SHAPES = {"qkv": (1280, 1024), "attn_out": (1024, 1024), "fc1": (8192, 1024), "fc2": (1024, 4096),
          "output": (73448, 1024)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    rows = []
    for site, (n_out, n_in) in SHAPES.items():
        dy = torch.randn(T, n_out, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(T, n_in, device="cuda", dtype=torch.bfloat16)
        acc = torch.empty(n_out, n_in, device="cuda", dtype=torch.float32)
        bf16 = triton.testing.do_bench(lambda: torch.mm(dy.t(), x), warmup=10, rep=200, return_mode="median")
        fp32 = triton.testing.do_bench(lambda: torch.addmm(acc, dy.t(), x, beta=0.0, out_dtype=torch.float32, out=acc),
                                       warmup=10, rep=200, return_mode="median")  # fmt: skip
        err = ((acc - (dy.t().float() @ x.float())).norm() / acc.norm()).item()
        flop = 2 * T * n_out * n_in
        row = {"site": site, "shape": [n_out, n_in, T], "bf16_out_ms": bf16, "fp32_out_ms": fp32,
               "bf16_TFLOPs": round(flop / bf16 / 1e9, 1), "fp32_TFLOPs": round(flop / fp32 / 1e9, 1),
               "fp32_out_rel_err_vs_fp32_math": err}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": T, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "wgrad_out_dtype.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
