"""Time FA4's SM90 backward at the 0.5B step's attention shape under tile configurations other than the one
it hard-codes for head dim 64, and with K / V expanded to every query head (MHA: dK / dV stored directly, no
fp32 accumulators or atomics across the 8 query heads of a group; the expansion and the group sum are timed
with it), to decide whether ops/attention/flash4.py should pass its own configuration.

FA4 (flash-attn-4 4.0.0b36) picks the SM90 backward tiles inside `_flash_attn_bwd` from
`_tile_size_bwd_sm90(head_dim, ...)` and ignores the tile arguments it takes; this script replaces that
function per variant. Its compile cache key omits num_stages_PdS, so each variant gets its own cache.
Every variant's gradients on batch 0 are compared with an fp64 reference, beside the default's.

    python benchmarks/gpu/fa4_bwd_configs.py --out DIR [--batch 8 --seq 4096 --heads 16 --kv-heads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from cuda_timer import interleaved_ms  # beside this script


def _cfg(tm, tn, sdp, dkv, dq, a_sdp, a_dkv, a_dq, pds=2, q_st=2, do_st=2, wg=2, dq_single=False) -> dict:
    return dict(m_block_size=tm, n_block_size=tn, num_stages_Q=q_st, num_stages_dO=do_st, num_stages_PdS=pds,
                SdP_swapAB=sdp, dKV_swapAB=dkv, dQ_swapAB=dq, AtomLayoutMSdP=a_sdp, AtomLayoutNdKV=a_dkv,
                AtomLayoutMdQ=a_dq, num_wg=wg, dQ_single_wg=dq_single)


# name -> (layout, BwdConfig fields or None for FA4's own pick). Candidates from FA4's sm90_config_search.py
# (feasible in registers and shared memory at head dim 64, least shared-memory traffic per block first).
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "gqa default": ("gqa", None),
    "mha default": ("mha", None),
    "gqa 128x128 PdS1": ("gqa", _cfg(128, 128, True, False, False, 1, 2, 2, pds=1)),
    "gqa 128x128 dQswap": ("gqa", _cfg(128, 128, True, False, True, 1, 2, 2)),
    "gqa 128x128 adQ1": ("gqa", _cfg(128, 128, True, False, False, 1, 2, 1)),
    "gqa 64x128": ("gqa", _cfg(64, 128, True, False, False, 1, 2, 1)),
    "gqa 128x96": ("gqa", _cfg(128, 96, False, True, False, 2, 2, 2)),
    "gqa 64x192": ("gqa", _cfg(64, 192, False, True, False, 1, 2, 1)),
    "gqa 192x64": ("gqa", _cfg(192, 64, True, False, True, 2, 1, 2)),
    "mha 128x128 PdS1": ("mha", _cfg(128, 128, True, False, False, 1, 2, 2, pds=1)),
    "mha 3wg 192x96": ("mha", _cfg(192, 96, False, True, False, 3, 3, 3, pds=1, do_st=1, wg=3)),
    "mha 64x128": ("mha", _cfg(64, 128, True, False, False, 1, 2, 1)),
}


def _reference_grads(q, k, v, do):
    """fp64 causal GQA attention gradients (one batch element): the ground truth every variant is held to."""
    q, k, v, do = (t.double().requires_grad_(t is not do) for t in (q, k, v, do))
    rep = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2), v.repeat_interleave(rep, 2).transpose(1, 2)
    s = (qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5
    S = s.shape[-1]
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    o = (s.softmax(-1) @ vh).transpose(1, 2)
    return torch.autograd.grad(o, (q, k, v), do)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=200.0, help="compile-and-check time before timing starts")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = ap.parse_args()
    import flash_attn.cute.interface as fi
    from flash_attn.cute.cache_utils import get_jit_cache

    B, S, n, g, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    rep = n // g
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, S, n, d, device=dev, dtype=dt, generator=gen)
    k = torch.randn(B, S, g, d, device=dev, dtype=dt, generator=gen)
    v = torch.randn(B, S, g, d, device=dev, dtype=dt, generator=gen)
    o, lse = fi._flash_attn_fwd(q, k, v, causal=True, return_lse=True)[:2]
    do = torch.randn(B, S, n, d, device=dev, dtype=dt, generator=gen)
    ref = _reference_grads(q[:1], k[:1], v[:1], do[:1])
    flop = 2.5 * 4.0 * B * n * S * S * d / 2  # causal backward: 2.5x the forward's half square
    own_pick, own_cache = fi._tile_size_bwd_sm90, fi._flash_attn_bwd.compile_cache

    def make(layout: str, cfg: dict | None, cache):
        pick = own_pick if cfg is None else (lambda *a, **kw: fi.BwdConfig(**cfg))

        def run():
            fi._tile_size_bwd_sm90, fi._flash_attn_bwd.compile_cache = pick, cache
            if layout == "gqa":
                return fi._flash_attn_bwd(q, k, v, o, do, lse, causal=True)[:3]
            kx, vx = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
            dq, dkx, dvx = fi._flash_attn_bwd(q, kx, vx, o, do, lse, causal=True)[:3]
            return dq, dkx.view(B, S, g, rep, d).sum(3), dvx.view(B, S, g, rep, d).sum(3)
        return run

    wanted = [s.strip() for s in args.only.split(",") if s.strip()] or list(VARIANTS)
    t0, rows, fns = time.monotonic(), [], {}
    for name in wanted:
        layout, cfg = VARIANTS[name]
        if time.monotonic() - t0 > args.budget_s:
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        fn = make(layout, cfg, own_cache if (layout, cfg) == ("gqa", None) else get_jit_cache(f"bwd_sweep_{len(fns)}"))
        try:
            c0 = time.monotonic()
            grads = fn()
            torch.cuda.synchronize()
            err = {f"rel_err_{nm}": ((gr[:1].double() - r).norm() / r.norm()).item() for nm, gr, r in zip(("dq", "dk", "dv"), grads, ref)}
            fns[name] = fn
            rows.append({"variant": name, "layout": layout, "config": cfg, "first_call_s": time.monotonic() - c0, **err})
            print(f"bwd {name:22s} compiled in {time.monotonic() - c0:5.1f}s  " + "  ".join(f"{k_} {v_:.2e}" for k_, v_ in err.items()), flush=True)
        except Exception as e:  # noqa: BLE001 - a configuration the kernel rejects is recorded, not fatal
            rows.append({"variant": name, "layout": layout, "config": cfg, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"bwd {name:22s} error {type(e).__name__}: {str(e)[:200]}", flush=True)
    by_name = {r["variant"]: r for r in rows}
    for name, times in interleaved_ms(fns, args.rounds, device="cuda").items():
        by_name[name]["ms_rounds"] = times
    fi._tile_size_bwd_sm90, fi._flash_attn_bwd.compile_cache = own_pick, own_cache
    base = statistics.median(by_name["gqa default"]["ms_rounds"]) if "gqa default" in fns else None
    for name in fns:
        r = by_name[name]
        r["ms"] = statistics.median(r["ms_rounds"])
        r["tflops"] = flop / r["ms"] / 1e9
        r["vs_default"] = base / r["ms"] if base else None
        print(f"bwd {name:22s} {r['ms']:7.3f} ms {r['tflops']:6.1f} TFLOP/s  x{r['vs_default'] or 0:.3f}  rounds "
              f"{[round(x, 3) for x in r['ms_rounds']]}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": {"batch": B, "seq": S, "heads": n, "kv_heads": g, "head_dim": d, "causal": True, "dtype": "bfloat16"},
              "flop_per_call": flop, "variants": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fa4_bwd_configs.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
