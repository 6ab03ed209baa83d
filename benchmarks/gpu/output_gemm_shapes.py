"""Time the output layer's three GEMMs (logits, d_hidden, d_weight) at MiniCPM4's vocabulary and at
padded vocabularies, to decide whether padding the output weight's rows pays (cuBLAS picks its kernel
by shape; the 0.5B step's profile showed the two backward GEMMs at ~340-410 TFLOP/s against ~700 for
the layers' GEMMs). Prints a table and writes JSON.

    python benchmarks/gpu/output_gemm_shapes.py --out DIR [--tokens 32768] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from cuda_timer import time_calls  # beside this script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocabs", default="73448,73472,73600,73728")
    args = ap.parse_args()
    T, h = args.tokens, args.hidden
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, h, device=dev, dtype=dt, generator=gen)
    rows = []
    for V in (int(v) for v in args.vocabs.split(",")):
        w = torch.randn(V, h, device=dev, dtype=dt, generator=gen)
        dz = torch.randn(T, V, device=dev, dtype=dt, generator=gen)
        acc = torch.randn(V, h, device=dev, dtype=dt, generator=gen)
        flop = 2.0 * T * V * h
        variants = {
            "logits x @ W^T": lambda: torch.mm(x, w.t()),
            "d_hidden dz @ W": lambda: torch.mm(dz, w),
            "d_hidden (W^T @ dz^T)^T": lambda: torch.mm(w.t(), dz.t()).t(),
            "d_weight dz^T @ x": lambda: torch.mm(dz.t(), x),
            "d_weight acc + dz^T @ x": lambda: torch.addmm(acc, dz.t(), x),
        }
        for name, fn in variants.items():
            ms = time_calls(fn, device="cuda").median_ms
            rows.append({"vocab": V, "gemm": name, "ms": ms, "tflops": flop / ms / 1e9})
            print(f"V={V:6d} {name:28s} {ms:7.3f} ms {flop / ms / 1e9:7.1f} TFLOP/s", flush=True)
        del w, dz, acc
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "tokens": T, "hidden": h}
    (args.out / "output_gemm_shapes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
