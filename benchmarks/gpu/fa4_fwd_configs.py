"""Time FA4's forward at the 0.5B step's attention shape under the launch options its entry point takes
(pack_gqa, tile_mn, mma_pv_is_rs, intra_wg_overlap), against the default it picks, to decide whether
ops/attention/flash4.py should pass any of them. The backward's SM90 tiles are fixed inside FA4 (its
arguments are overridden on SM90), so only the forward is searched; the backward is timed once for scale.
Each variant's output is compared with the default's (same math: differences are summation order).

    python benchmarks/gpu/fa4_fwd_configs.py --out DIR [--batch 8 --seq 4096 --heads 16 --kv-heads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from cuda_timer import interleaved_ms, time_calls  # beside this script


VARIANTS: dict[str, dict] = {  # name -> keyword arguments of _flash_attn_fwd beyond causal / return_lse
    "default": {},
    "pack_gqa=False": {"pack_gqa": False},
    "tile 128x128": {"tile_mn": (128, 128)},
    "tile 192x128 no-RS": {"tile_mn": (192, 128), "mma_pv_is_rs": False},
    "no-overlap": {"intra_wg_overlap": False},
    "tile 192x128 no-overlap": {"tile_mn": (192, 128), "intra_wg_overlap": False},
    "pack_gqa=False no-overlap": {"pack_gqa": False, "intra_wg_overlap": False},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (clock drift hits every variant)")
    args = ap.parse_args()
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    B, S, n, g, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, S, n, d, device=dev, dtype=dt, generator=gen)
    k = torch.randn(B, S, g, d, device=dev, dtype=dt, generator=gen)
    v = torch.randn(B, S, g, d, device=dev, dtype=dt, generator=gen)
    flop = 4.0 * B * n * S * S * d / 2  # causal: half the square
    t0 = time.monotonic()
    base_out, base_lse = _flash_attn_fwd(q, k, v, causal=True, return_lse=True)[:2]
    rows, fns = [], {}
    for name, kw in VARIANTS.items():  # compile and check each variant once
        if time.monotonic() - t0 > args.budget_s:
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        try:
            fn = lambda kw=kw: _flash_attn_fwd(q, k, v, causal=True, return_lse=True, **kw)  # noqa: E731
            out, lse = fn()[:2]
            fns[name] = fn
            rows.append({"variant": name, "kwargs": {k_: list(v_) if isinstance(v_, tuple) else v_ for k_, v_ in kw.items()},
                         "max_abs_diff_vs_default": (out.float() - base_out.float()).abs().max().item(),
                         "lse_max_diff": (lse - base_lse).abs().max().item()})
        except Exception as e:  # noqa: BLE001 - a variant the kernel does not support is recorded, not fatal
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"fwd {name:26s} error {type(e).__name__}: {str(e)[:160]}", flush=True)
    by_name = {r["variant"]: r for r in rows}
    for name, times in interleaved_ms(fns, args.rounds, device="cuda").items():
        by_name[name]["ms_rounds"] = times
    for name in fns:
        r = by_name[name]
        r["ms"] = statistics.median(r["ms_rounds"])
        r["tflops"] = flop / r["ms"] / 1e9
        print(f"fwd {name:26s} {r['ms']:7.3f} ms {r['tflops']:6.1f} TFLOP/s  rounds {[round(x, 3) for x in r['ms_rounds']]}"
              f"  |out-default| {r['max_abs_diff_vs_default']:.2e}", flush=True)
    do = torch.randn_like(base_out)
    bwd_ms = time_calls(lambda: _flash_attn_bwd(q, k, v, base_out, do, base_lse, causal=True), device="cuda",
                        warmup=3).median_ms
    print(f"bwd default {bwd_ms:7.3f} ms {2.5 * flop / bwd_ms / 1e9:6.1f} TFLOP/s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": {"batch": B, "seq": S, "heads": n, "kv_heads": g, "head_dim": d, "causal": True, "dtype": "bfloat16"},
              "fwd": rows, "bwd_default_ms": bwd_ms, "bwd_tflops": 2.5 * flop / bwd_ms / 1e9}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fa4_fwd_configs.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
