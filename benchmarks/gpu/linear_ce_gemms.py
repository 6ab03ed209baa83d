"""The fused output layer + CE (the engine's triton_fused.fused_linear_cross_entropy_fwd_bwd) per `gemms` mode at
the 0.5B step's shape: "cublas", "quack" (logits and dx GEMMs on quack, pinned configs), "quack_lse" (also each
row's logsumexp from the logits GEMM's epilogue, so the gradient pass reads the logits once). Loss and
gradients are compared with the cublas mode's and with an fp32 loss; times are interleaved medians.

    PYTHONPATH=exports/train_engine_0.5B/src:... python benchmarks/gpu/linear_ce_gemms.py --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from cuda_timer import interleaved_ms  # beside this script

from train_engine_0_5b.ops import space
from train_engine_0_5b.ops.cross_entropy import triton_fused as ce
from train_engine_0_5b.ops.table import check_values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=ce.LINEAR_CE_CHUNK)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--launches", default="", help="quack_lse's one-pass kernel launches to add: BLOCK_V:warps[:split],...")
    args = ap.parse_args()
    T, h, V = args.tokens, 1024, 73448
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, h, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(V, h, device="cuda", generator=gen) * h**-0.5).to(torch.bfloat16)
    labels = torch.randint(0, V, (T,), device="cuda", generator=gen)
    labels[::10] = ce.IGNORE_INDEX
    scale = torch.tensor(1.0 / T, device="cuda")

    def run(gemms: str):
        return ce.fused_linear_cross_entropy_fwd_bwd(x, w, labels, chunk_size=args.chunk, grad_scale=scale, gemms=gemms)

    with torch.no_grad():  # fp32 loss over chunks
        ref_loss = sum(torch.nn.functional.cross_entropy(x[i:i + 4096].float() @ w.float().t(), labels[i:i + 4096],
                                                         reduction="sum") for i in range(0, T, 4096))  # fmt: skip
    base = run("cublas")
    modes = {"cublas": None, "quack": None, "quack_lse": None}
    for item in filter(None, args.launches.split(",")):  # BLOCK_V:warps, or BLOCK_V:warps:split
        block, warps, *split = item.split(":")
        modes[f"quack_lse {block}x{warps}w{' split' if split else ''}"] = {
            "grad_block_v": int(block), "grad_num_warps": int(warps), "grad_split": split == ["split"]}

    def run_mode(mode: str):  # the one-pass launch through the engine's declared space (None: its defaults)
        values = check_values("linear_cross_entropy", "quack_triton", modes[mode] or {})
        space.activate({("linear_cross_entropy", "quack_triton"): values} if values else {})
        return run(mode.split()[0])

    rows = {}
    for mode in modes:
        try:
            loss, _, dx, dw = run_mode(mode)
            rows[mode] = {"loss_rel_vs_fp32": float((loss - ref_loss).abs() / ref_loss.abs()),
                          "dx_rel_vs_cublas": float((dx.float() - base[2].float()).norm() / base[2].float().norm()),
                          "dw_rel_vs_cublas": float((dw - base[3]).norm() / base[3].norm())}
        except Exception as e:  # noqa: BLE001 - a mode that cannot run here is a result
            rows[mode] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    ok = {m: (lambda m=m: run_mode(m)) for m in rows if "error" not in rows[m]}
    for mode, times in interleaved_ms(ok, rounds=args.rounds, device="cuda").items():
        rows[mode].update(ms=sorted(times)[len(times) // 2], rounds_ms=times)
    for mode, r in rows.items():
        print(mode, json.dumps(r), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": T, "chunk": args.chunk,
            "default_one_pass_launch": {n: space.value("linear_cross_entropy", "quack_triton", n)
                                        for n in ("grad_block_v", "grad_num_warps", "grad_split")}}
    (args.out / "linear_ce_gemms.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
