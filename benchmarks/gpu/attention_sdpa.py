"""Which SDPA backend for causal GQA attention at MiniCPM4-0.5B shapes, and what it is worth in a
compiled whole step. Run on one GPU: `python benchmarks/gpu/attention_sdpa.py OUT.json`.

Part 1: fwd and fwd+bwd TFLOP/s of each SDPA backend (flash, cuDNN, mem-efficient) at B x 4096,
16 q heads / 2 kv heads, d=64, bf16, and the error against a float64 reference on a slice.
Part 2: a torch.compile'd training step of the reference math (gates/stacks/torch_ref) with SDPA as
attention, default backend choice vs cuDNN forced, micro batch 8, seq 4096.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from benchmarks.gpu.step_variants import make_attention
from gates.model_config import preset
from gates.stacks.torch_ref import model as ref

B, S, N, G, D = 8, 4096, 16, 2, 64
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def attn_flops(b):  # causal: half of 4*b*n*s*s*d for fwd; bwd = 2.5 x fwd
    return 2 * b * N * S * S * D


def part1():
    rows = {}
    dev = "cuda"
    q = torch.randn(B, N, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, G, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, G, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(B, N, S, D, device=dev, dtype=torch.bfloat16)
    # fp64 reference on a slice (1 batch, seq 1024) for the error column
    qs, ks, vs = (t[:1, :, :1024].detach().double() for t in (q, k, v))
    kr, vr = ks.repeat_interleave(N // G, 1), vs.repeat_interleave(N // G, 1)
    mask = torch.ones(1024, 1024, dtype=torch.bool, device=dev).tril()
    want = ((qs @ kr.transpose(-1, -2)) / math.sqrt(D)).masked_fill(~mask, -math.inf).softmax(-1) @ vr
    for name, be in BACKENDS.items():
        try:
            with sdpa_kernel([be]):
                got = sdpa(*(t[:1, :, :1024].detach() for t in (q, k, v))).double()
                err = float((got - want).norm() / want.norm())
                fwd = do_bench(lambda: sdpa(q, k, v), warmup=50, rep=300, return_mode="median")
                def fb():
                    q.grad = k.grad = v.grad = None
                    sdpa(q, k, v).backward(do)
                fb_ms = do_bench(fb, warmup=50, rep=300, return_mode="median")
            rows[name] = {"fwd_ms": fwd, "fwd_bwd_ms": fb_ms, "fwd_tflops": attn_flops(B) / fwd / 1e9,
                          "fwd_bwd_tflops": 3.5 * attn_flops(B) / fb_ms / 1e9, "rel_err_vs_fp64": err}
        except Exception as e:  # a backend that cannot run this shape is a result, not a crash
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, rows[name], flush=True)
    return rows


def part2(mb=8, steps=8, warm=3):
    cfg = preset("minicpm4-0.5b")
    ref.Attention = make_attention(None)  # reference math, attention through SDPA (torch picks the backend)
    out = {}
    for label, backends in [("default", None), ("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("flash", [SDPBackend.FLASH_ATTENTION])]:
        torch.manual_seed(0)
        m = ref.MiniCPM(cfg).cuda().bfloat16()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, cfg.vocab_size, (mb, S), device="cuda")

        def loss_fn(ids):
            logits = m(ids)
            return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())

        cl = torch.compile(loss_fn)
        times = []
        try:
            torch.cuda.reset_peak_memory_stats()
            for i in range(warm + steps):
                torch.cuda.synchronize(); t0 = time.perf_counter()
                if backends:
                    with sdpa_kernel(backends):
                        cl(ids).backward()
                else:
                    cl(ids).backward()
                opt.step(); opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
            med = sorted(times[warm:])[steps // 2]
            tps = mb * S / med
            out[label] = {"step_s": med, "tokens_per_s": tps, "mfu": tps * cfg.flops_per_token(S) / 989.4e12,
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        except Exception as e:
            out[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(label, out[label], flush=True)
        del m, opt, cl
        torch._dynamo.reset(); torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
           "sdpa_backends": part1(), "compiled_step_mb8": part2()}
    json.dump(res, open(sys.argv[1], "w"), indent=2)
