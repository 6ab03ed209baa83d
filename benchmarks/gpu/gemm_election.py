"""Elect a kernel per GEMM site of the 0.5B step: cuBLAS (torch.mm) against quack's CuTeDSL GEMM with its
heuristic config and with pinned SM90 configs, at the step's shapes and operand layouts (issue 8, item 3:
"elect per shape by measurement"). Also times the fc2 dgrad with the SwiGLU gradient in its epilogue
(quack `gemm_dact`, gated) against cuBLAS plus the engine's Triton dSwiGLU pass.

Each variant is checked against an fp32 matmul of the same bf16 inputs (relative Frobenius error) before it
is timed; a variant that fails to compile or launch is recorded with its error. CuTeDSL compiles each config
on first use (seconds each), so sites run in priority order under --budget-s and the JSON is rewritten after
every variant: a cut-off run still leaves what it measured.

    python benchmarks/gpu/gemm_election.py --out DIR [--budget-s 420] [--sites fc2.dgrad,o.fwd]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from cuda_timer import interleaved_ms  # beside this script

M, H, F, QKV, V_CHUNK, VOCAB = 8 * 4096, 1024, 4096, 1280, 8192, 73448

# SM90 configs tried after quack's heuristic, most promising first for M = 32768 (tile_m, tile_n, pingpong,
# cluster_m, cluster_n).
CONFIGS = [
    (256, 128, False, 2, 1), (256, 128, False, 1, 2), (128, 256, False, 2, 1), (256, 192, False, 1, 2),
    (128, 192, True, 2, 1), (256, 160, False, 1, 2), (128, 256, False, 1, 2), (128, 128, True, 2, 1),
    (256, 208, False, 1, 2), (128, 160, True, 2, 1),
    # pingpong variants (the fastest for the gated dgrad and the logits GEMM in a first run)
    (128, 128, True, 1, 2), (128, 192, True, 1, 2), (128, 160, True, 1, 2), (128, 208, True, 2, 1),
    (192, 128, True, 2, 1),
]


def _sites(dev: torch.device, gen: torch.Generator) -> dict[str, Callable[[], tuple]]:
    """Site name -> a maker of (A, B, flop) with the engine's layouts: out = A @ B (B may be a transposed view)."""
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=gen) * 0.05

    return {
        "fc2.dgrad": lambda: (r(M, H), r(H, F)),             # dout @ W2, W2 (h, f) row-major
        "o.fwd": lambda: (r(M, H), r(H, H).t()),            # x @ Wo^T
        "o.dgrad": lambda: (r(M, H), r(H, H)),              # dout @ Wo
        "qkv.fwd": lambda: (r(M, H), r(QKV, H).t()),        # x @ Wqkv^T
        "qkv.dgrad": lambda: (r(M, QKV), r(QKV, H)),        # dqkv @ Wqkv
        "out.fwd": lambda: (r(V_CHUNK, H), r(VOCAB, H).t()),  # one CE chunk's logits
        "fc1.dgrad": lambda: (r(M, 2 * F), r(2 * F, H)),    # dpreact @ W1i
        "fc2.fwd": lambda: (r(M, F), r(H, F).t()),          # postact @ W2^T
        "fc2.wgrad": lambda: (r(M, H).t(), r(M, F)),        # dout^T @ postact
        "fc1.wgrad": lambda: (r(M, 2 * F).t(), r(M, H)),    # dpreact^T @ x
        "o.wgrad": lambda: (r(M, H).t(), r(M, H)),          # dout^T @ attn
        "out.dgrad": lambda: (r(V_CHUNK, VOCAB), r(VOCAB, H)),  # one CE chunk's dlogits @ W
        "out.wgrad": lambda: (r(V_CHUNK, VOCAB).t(), r(V_CHUNK, H)),  # one CE chunk's dlogits^T @ x
    }


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--sites", default="fc2.dgrad,dgated,o.fwd,o.dgrad,qkv.fwd,qkv.dgrad,out.fwd,fc1.dgrad,fc2.fwd")
    ap.add_argument("--configs", default=f"0:{len(CONFIGS)}", help="a slice of CONFIGS tried per site, start:stop")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    t_start = time.time()
    lo, hi = (int(v) for v in args.configs.split(":"))
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    from quack.gemm_config import GemmConfig
    from quack.gemm_interface import gemm, gemm_dact, gemm_tuned

    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "M": M, "budget_s": args.budget_s}
    try:
        import quack
        meta["quack"] = getattr(quack, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "gemm_election.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

    def pinned(tm, tn, pp, cm, cn) -> GemmConfig:
        return GemmConfig(tile_m=tm, tile_n=tn, pingpong=pp, cluster_m=cm, cluster_n=cn, swap_ab=False,
                          device_capacity=9, is_dynamic_persistent=False, use_tma_gather=False)

    def measure(site: str, flop: float, fns: dict[str, Callable[[], torch.Tensor]], check: Callable) -> None:
        """Compile + check each variant (recording failures), then time the survivors interleaved."""
        ok: dict[str, Callable] = {}
        for name, fn in fns.items():
            if time.time() - t_start > args.budget_s:
                rows.append({"site": site, "variant": name, "skipped": "budget"})
                continue
            t0 = time.time()
            try:
                err = check(fn())
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a config that does not compile or launch is a result
                rows.append({"site": site, "variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}",
                             "first_call_s": round(time.time() - t0, 1)})
                print(f"{site:10s} {name:28s} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
                traceback.print_exc(limit=2)
                save()
                continue
            rows.append({"site": site, "variant": name, "rel_err": err, "first_call_s": round(time.time() - t0, 1)})
            ok[name] = fn
            save()
        if not ok:
            return
        times = interleaved_ms(ok, rounds=args.rounds, device="cuda")
        for row in rows:
            if row["site"] == site and row["variant"] in times:
                ms = sorted(times[row["variant"]])[len(times[row["variant"]]) // 2]
                row.update(ms=ms, rounds_ms=times[row["variant"]], tflops=flop / ms / 1e9)
                print(f"{site:10s} {row['variant']:28s} {ms:7.3f} ms {flop / ms / 1e9:6.1f} TFLOP/s "
                      f"err {row['rel_err']:.1e} first {row['first_call_s']}s", flush=True)
        save()

    makers = _sites(dev, gen)
    for site in args.sites.split(","):
        if time.time() - t_start > args.budget_s:
            rows.append({"site": site, "skipped": "budget"})
            save()
            continue
        if site == "dgated":
            dout = torch.randn(M, H, device=dev, dtype=torch.bfloat16, generator=gen) * 0.05
            w2 = torch.randn(H, F, device=dev, dtype=torch.bfloat16, generator=gen) * 0.05
            pre = torch.randn(M, 2 * F, device=dev, dtype=torch.bfloat16, generator=gen)
            dpost32 = dout.float() @ w2.float()
            g, u = pre[:, 0::2].float(), pre[:, 1::2].float()
            sig = torch.sigmoid(g)
            ref = torch.stack((dpost32 * u * sig * (1 + g * (1 - sig)), dpost32 * g * sig), -1).flatten(-2)
            del dpost32, g, u, sig
            fns: dict[str, Callable] = {}
            try:
                from train_engine_0_5b.ops.mlp.dswiglu import launch as dswiglu
                fns["cublas+triton_dswiglu"] = lambda: dswiglu(pre, torch.mm(dout, w2))
            except Exception as e:  # noqa: BLE001
                meta["dswiglu_unavailable"] = str(e)[:200]
            fns["quack_dgated:heuristic"] = lambda: gemm_dact(dout, w2, pre, activation="swiglu", tuned=False)[0]
            for c in CONFIGS[lo:hi]:
                if c[1] % 32 == 0:
                    fns[f"quack_dgated:{c}"] = (lambda cfg=pinned(*c): gemm_dact(
                        dout, w2, pre, activation="swiglu", tuned=False, config=cfg)[0])
            measure("dgated", 2.0 * M * H * F, fns, lambda out: _rel(out, ref))
            del dout, w2, pre, ref
            torch.cuda.empty_cache()
            continue
        a, b = makers[site]()
        ref = a.float() @ b.float()
        flop = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        out = torch.empty(a.shape[0], b.shape[1], device=dev, dtype=torch.bfloat16)
        fns = {"cublas": lambda: torch.mm(a, b), "quack:heuristic": lambda: gemm(a, b, tuned=False)}
        for c in CONFIGS[lo:hi]:
            fns[f"quack:{c}"] = (lambda cfg=pinned(*c): (gemm_tuned.fn(a, b, out, config=cfg), out)[1])
        meta.setdefault("layouts", {})[site] = {"A": [list(a.shape), list(a.stride())], "B": [list(b.shape), list(b.stride())]}
        measure(site, flop, fns, lambda o: _rel(o, ref))
        del a, b, ref, out
        torch.cuda.empty_cache()
    meta["wall_s"] = round(time.time() - t_start, 1)
    save()


if __name__ == "__main__":
    main()
