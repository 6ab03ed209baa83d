"""Whole-step variants of the 0.5B reference math under torch.compile, to find where the time goes
before building the engine's fast path. `python benchmarks/gpu/step_variants.py OUT.json`.

Variants: attention backend forced *inside* the compiled region (flash vs cuDNN), output+CE
chunked (no full logits), micro batch 8 vs 12.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gates.model_config import preset
from gates.stacks.torch_ref import model as ref

S = 4096
CFG = preset("minicpm4-0.5b")
BACKEND = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def make_attention(backend: str | None):
    """The reference attention through SDPA, with `backend` forced inside it (None: torch's own choice)."""
    class A(ref.Attention):
        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q = self.q_proj(x).view(b, s, self.n, self.d).transpose(1, 2)
            k = self.k_proj(x).view(b, s, self.g, self.d).transpose(1, 2)
            v = self.v_proj(x).view(b, s, self.g, self.d).transpose(1, 2)
            q, k = ref.apply_rope(q, cos, sin), ref.apply_rope(k, cos, sin)
            with sdpa_kernel([BACKEND[backend]]) if backend else contextlib.nullcontext():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.o_proj(o.transpose(1, 2).reshape(b, s, self.n * self.d))
    return A


def run(label, backend, mb, chunked_ce, compile_mode=None, steps=8, warm=3):
    ref.Attention = make_attention(backend)
    torch.manual_seed(0)
    m = ref.MiniCPM(CFG).cuda().bfloat16()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, CFG.vocab_size, (mb, S), device="cuda")

    def body(ids):
        x = m.model.embed_tokens(ids) * CFG.scale_emb
        cos, sin = ref.rope_cos_sin(CFG, S, x.device, x.dtype)
        for layer in m.model.layers:
            x = layer(x, cos, sin)
        return m.model.norm(x) / CFG.logit_scale

    def ce_chunk(h, w, y):
        return F.cross_entropy((h @ w.t()).float(), y, reduction="sum")

    cbody = torch.compile(body, mode=compile_mode)
    cce = torch.compile(ce_chunk)

    def step(ids):
        if not chunked_ce:
            h = cbody(ids)
            loss = cce(h.flatten(0, 1), m.output_weight(), ids.flatten()) / ids.numel()
            loss.backward()
            return
        h = cbody(ids)
        hd = h.detach().flatten(0, 1).requires_grad_(True)
        y = ids.flatten()
        n = hd.shape[0]
        for i in range(0, n, 8192):  # chunk: logits of 8192 tokens at a time, backward per chunk
            (cce(hd[i:i + 8192], m.output_weight(), y[i:i + 8192]) / n).backward()
        h.backward(hd.grad.view_as(h))

    times = []
    try:
        torch.cuda.reset_peak_memory_stats()
        for _ in range(warm + steps):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            step(ids)
            opt.step(); opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
        med = sorted(times[warm:])[steps // 2]
        tps = mb * S / med
        r = {"backend": backend, "mb": mb, "chunked_ce": chunked_ce, "compile_mode": compile_mode, "step_s": med,
             "tokens_per_s": tps, "mfu": tps * CFG.flops_per_token(S) / 989.4e12, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    except Exception as e:
        r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(label, r, flush=True)
    del m, opt
    torch._dynamo.reset(); torch.cuda.empty_cache()
    return r


if __name__ == "__main__":
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["flash_mb8"] = run("flash_mb8", "flash", 8, False)
    res["cudnn_mb8"] = run("cudnn_mb8", "cudnn", 8, False)
    res["cudnn_mb8_chunkce"] = run("cudnn_mb8_chunkce", "cudnn", 8, True)
    res["cudnn_mb12_chunkce"] = run("cudnn_mb12_chunkce", "cudnn", 12, True)
    res["cudnn_mb8_maxautotune"] = run("cudnn_mb8_maxautotune_nocg", "cudnn", 8, True, "max-autotune-no-cudagraphs")
    json.dump(res, open(sys.argv[1], "w"), indent=2)
