"""GPU check of the Triton fused kernels (ops/*/triton_fused.py) at MiniCPM4-0.5B production shapes.

    python exports/train_engine_0.5B/scripts/gpu_kernels.py [--tests all|gpu|none] [--no-compile] [--budget S]

On one H100 (torch 2.11, triton 3.6): first the gpu-marked op tests (tests/ops, bf16, production-sized)
through pytest; then, per op, in bf16 at T = 8 x 4096 tokens, h 1024, f 4096, V 73448, 16 q / 2 kv heads
of 64, and AdamW over the 0.5B parameter list:
  - error against an fp64 reference (norm-wise relative error, ||x - ref|| / ||ref||), beside the error of
    the plain-torch bf16 reference itself, so the two can be compared;
  - time: triton.testing.do_bench median (L2 flushed between runs) of the Triton version, of the eager
    torch reference and of torch.compile of it; achieved GB/s (or TFLOP/s for the fused output GEMMs).
then a few launch settings around the defaults (tuning hints); last, with the time left, the other op
tests (fp32 edge shapes) through the compiled kernels. Writes $OUT/kernels.json (or --out) and prints a
table. Stays inside --budget seconds (default 225): torch.compile baselines and the last tests are
skipped, and say so, when too little time is left.
`--smoke` runs the same code on a CPU (Triton interpreter, tiny shapes, wall-clock timing): it checks the
script, not the kernels' speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tests", choices=["all", "gpu", "none"], default="all", help="tests/ops tests run first")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--budget", type=float, default=225.0, help="seconds for the whole run")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for kernels.json (default $OUT)")
    p.add_argument("--smoke", action="store_true", help="CPU dry run: interpreter, tiny shapes")
    return p.parse_args()


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (kernels are decorated at import)
sys.path.insert(0, str(ENGINE / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from train_engine_0_5b.core.optim import clip_coefficient  # noqa: E402
from train_engine_0_5b.ops.adamw import foreach as adamw_foreach  # noqa: E402
from train_engine_0_5b.ops.adamw import triton_fused as adamw_t  # noqa: E402
from train_engine_0_5b.ops.cross_entropy import triton_fused as ce_t  # noqa: E402
from train_engine_0_5b.ops.rmsnorm import triton_fused as norm_t  # noqa: E402
from train_engine_0_5b.ops.rope import triton_fused as rope_t  # noqa: E402
from train_engine_0_5b.ops.rope.reference import rope_tables  # noqa: E402
from train_engine_0_5b.ops.swiglu import triton_fused as swiglu_t  # noqa: E402

START = time.monotonic()
DEV = "cpu" if ARGS.smoke else "cuda"
BF16 = torch.bfloat16
# production shapes (smoke: tiny ones of the same structure)
if ARGS.smoke:
    B, S, H, FF, V, NQ, NKV, D, LAYERS, CE_CHECK_ROWS = 1, 64, 64, 128, 1000, 4, 2, 16, 2, 32
else:
    B, S, H, FF, V, NQ, NKV, D, LAYERS, CE_CHECK_ROWS = 8, 4096, 1024, 4096, 73448, 16, 2, 64, 24, 2048
T = B * S
EPS, RES_SCALE, LOGIT_SCALE = 1e-6, 1.4 / math.sqrt(24), 1024 / 256
ROWS: list[dict] = []  # one per (op, pass, implementation)
ERRORS: list[dict] = []  # one per checked output


def left() -> float:
    return ARGS.budget - (time.monotonic() - START)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0, dtype=BF16) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), device=DEV, dtype=torch.float32) * scale).to(dtype)


def bench_ms(fn) -> float:
    if ARGS.smoke:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def record(op: str, pass_: str, impl: str, fn, *, bytes_: float = 0.0, flops: float = 0.0) -> None:
    ms = bench_ms(fn)
    row = dict(op=op, pass_=pass_, impl=impl, ms=round(ms, 4))
    if bytes_:
        row["GB/s"] = round(bytes_ / ms / 1e6, 1)
    if flops:
        row["TFLOP/s"] = round(flops / ms / 1e9, 1)
    ROWS.append(row)


def compiled(fn):
    """torch.compile of a reference, or None when disabled / out of time (the table says so)."""
    if ARGS.no_compile or ARGS.smoke or left() < 60:
        return None
    return torch.compile(fn, dynamic=False)


def record_baselines(op: str, pass_: str, eager, make_call, **kw) -> None:
    """eager: the reference fn; make_call(fn) -> a no-arg callable running one pass with fn. torch.compile
    only for training passes (fwd+bwd): compiling costs ~10-20 s each and the budget is 4 minutes."""
    record(op, pass_, "torch eager", make_call(eager), **kw)
    if pass_ != "fwd+bwd":
        return
    fn = compiled(eager)
    if fn is None:
        ROWS.append(dict(op=op, pass_=pass_, impl="torch.compile", skipped="disabled or out of time"))
        return
    call = make_call(fn)
    call()  # compile outside the timing
    record(op, pass_, "torch.compile", call, **kw)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(op: str, name: str, ours: torch.Tensor, ref64: torch.Tensor, torch_bf16: torch.Tensor | None = None) -> None:
    row = dict(op=op, output=name, rel_err=rel_err(ours, ref64), finite=bool(torch.isfinite(ours).all()))
    if torch_bf16 is not None:
        row["torch_bf16_rel_err"] = rel_err(torch_bf16, ref64)
    ERRORS.append(row)


def grads_of(fn, inputs, douts):
    """Outputs and input gradients of fn(*inputs) for output gradients douts (no .grad accumulation)."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad([o for o in outs if o.requires_grad], inputs, douts[: len(outs)], allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def free() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- the ops ----------------------------------------------------------------------------------------


def swiglu() -> None:
    gate, up, dout = randn(T, FF, seed=1, scale=3), randn(T, FF, seed=2), randn(T, FF, seed=3)
    gate_up = torch.cat([gate, up], dim=-1)
    (out,), (dg, du) = grads_of(swiglu_t.swiglu, [gate, up], [dout])
    (ref_out,), (ref_dg, ref_du) = grads_of(swiglu_t.swiglu_reference, [gate.double(), up.double()], [dout.double()])
    (t_out,), (t_dg, t_du) = grads_of(swiglu_t.swiglu_reference, [gate, up], [dout])
    for name, a, r, t in [("out", out, ref_out, t_out), ("d_gate", dg, ref_dg, t_dg), ("d_up", du, ref_du, t_du)]:
        check("swiglu", name, a, r, t)
    (fout,), (dgu,) = grads_of(swiglu_t.swiglu_fused, [gate_up], [dout])
    check("swiglu_fused", "out", fout, ref_out)
    check("swiglu_fused", "d_gate_up", dgu, torch.cat([ref_dg, ref_du], dim=-1))
    del ref_out, ref_dg, ref_du, t_out, t_dg, t_du
    fwd_bytes, bwd_bytes = 3 * T * FF * 2, 5 * T * FF * 2
    record("swiglu", "fwd", "triton", lambda: swiglu_t.swiglu_fwd(gate, up), bytes_=fwd_bytes)
    fused_fwd = lambda: swiglu_t.swiglu_fwd(*gate_up.chunk(2, -1))  # noqa: E731
    record("swiglu", "fwd", "triton fused [gate|up]", fused_fwd, bytes_=fwd_bytes)
    record_baselines("swiglu", "fwd", swiglu_t.swiglu_reference, lambda f: (lambda: f(gate, up)), bytes_=fwd_bytes)
    record("swiglu", "bwd", "triton", lambda: swiglu_t.swiglu_bwd(dout, gate, up), bytes_=bwd_bytes)
    fb = lambda f: (lambda: grads_of(f, [gate, up], [dout]))  # noqa: E731
    record("swiglu", "fwd+bwd", "triton", fb(swiglu_t.swiglu), bytes_=fwd_bytes + bwd_bytes)
    record_baselines("swiglu", "fwd+bwd", swiglu_t.swiglu_reference, fb, bytes_=fwd_bytes + bwd_bytes)


def rmsnorm() -> None:
    x, y = randn(T, H, seed=4, scale=2), randn(T, H, seed=5, scale=3)
    w = (1 + 0.5 * randn(H, seed=6, dtype=torch.float32)).to(BF16)
    dout, dnew = randn(T, H, seed=7), randn(T, H, seed=8)
    ours = lambda x_, y_, w_: norm_t.add_rms_norm(x_, y_, w_, EPS, RES_SCALE)  # noqa: E731
    ref = lambda x_, y_, w_: norm_t.add_rms_norm_reference(x_, y_, w_, EPS, RES_SCALE)  # noqa: E731
    outs, grads = grads_of(ours, [x, y, w], [dout, dnew])
    r_outs, r_grads = grads_of(ref, [x.double(), y.double(), w.double()], [dout.double(), dnew.double()])
    t_outs, t_grads = grads_of(ref, [x, y, w], [dout, dnew])
    names = ["out", "new_x", "d_x", "d_y", "d_weight"]
    for name, a, r, t in zip(names, outs + grads, r_outs + r_grads, t_outs + t_grads):
        check("add_rms_norm", name, a, r, t)
    same_new_x, same_out = bool(torch.equal(outs[1], t_outs[1])), (outs[0] == t_outs[0]).float().mean().item()
    ERRORS.append(dict(op="add_rms_norm", output="new_x bit-identical to torch bf16", value=same_new_x))
    ERRORS.append(dict(op="add_rms_norm", output="out bit-identical fraction", value=same_out))
    del r_outs, r_grads, t_outs, t_grads
    fwd_bytes, bwd_bytes = 4 * T * H * 2, 5 * T * H * 2
    fwd = lambda: norm_t.rms_norm_fwd(x, w, EPS, y=y, residual_scale=RES_SCALE)  # noqa: E731
    record("add_rms_norm", "fwd", "triton", fwd, bytes_=fwd_bytes)
    record_baselines("add_rms_norm", "fwd", ref, lambda f: (lambda: f(x, y, w)), bytes_=fwd_bytes)
    fb = lambda f: (lambda: grads_of(f, [x, y, w], [dout, dnew]))  # noqa: E731
    record("add_rms_norm", "fwd+bwd", "triton", fb(ours), bytes_=fwd_bytes + bwd_bytes)
    record_baselines("add_rms_norm", "fwd+bwd", ref, fb, bytes_=fwd_bytes + bwd_bytes)
    record("rms_norm", "fwd", "triton", lambda: norm_t.rms_norm_fwd(x, w, EPS), bytes_=2 * T * H * 2)
    record_baselines("rms_norm", "fwd", norm_t.rms_norm_reference, lambda f: (lambda: f(x, w, EPS)), bytes_=4 * T * H)


def rope() -> None:
    q, k = randn(B, S, NQ, D, seed=9), randn(B, S, NKV, D, seed=10)
    dq, dk = randn(B, S, NQ, D, seed=11), randn(B, S, NKV, D, seed=12)
    cos, sin = rope_tables(S, D, device=DEV)  # fp32
    cos64, sin64 = rope_tables(S, D, device=DEV, dtype=torch.float64)
    cos16, sin16 = cos.to(BF16), sin.to(BF16)  # the reference model's tables (in the activations' dtype)
    outs, grads = grads_of(lambda a, b: rope_t.rope(a, b, cos, sin), [q, k], [dq, dk])
    ref64 = lambda a, b: rope_t.rope_reference(a, b, cos64, sin64)  # noqa: E731
    r_outs, r_grads = grads_of(ref64, [q.double(), k.double()], [dq.double(), dk.double()])
    t_outs, t_grads = grads_of(lambda a, b: rope_t.rope_reference(a, b, cos16, sin16), [q, k], [dq, dk])
    for name, a, r, t in zip(["q", "k", "d_q", "d_k"], outs + grads, r_outs + r_grads, t_outs + t_grads):
        check("rope", name, a, r, t)
    del r_outs, r_grads, t_outs, t_grads
    nbytes = 2 * B * S * (NQ + NKV) * D * 2
    record("rope", "fwd", "triton", lambda: rope_t.rope_rotate(q, k, cos, sin), bytes_=nbytes)
    ref = lambda a, b: rope_t.rope_reference(a, b, cos16, sin16)  # noqa: E731
    record_baselines("rope", "fwd", ref, lambda f: (lambda: f(q, k)), bytes_=nbytes)
    fb = lambda f: (lambda: grads_of(f, [q, k], [dq, dk]))  # noqa: E731
    record("rope", "fwd+bwd", "triton", fb(lambda a, b: rope_t.rope(a, b, cos, sin)), bytes_=2 * nbytes)
    record_baselines("rope", "fwd+bwd", ref, fb, bytes_=2 * nbytes)


def _labels(n: int, seed: int) -> torch.Tensor:
    labels = torch.randint(0, V, (n,), generator=gen(seed), device=DEV)
    labels[::50] = ce_t.IGNORE_INDEX  # ~2 % ignored (packing boundaries)
    return labels


def cross_entropy() -> None:
    """The registry op on materialized (T, V) bf16 logits."""
    logits, labels = randn(T, V, seed=13, scale=3), _labels(T, seed=14)
    one = torch.tensor(1.0, device=DEV)
    loss, (grad,) = grads_of(lambda z: ce_t.cross_entropy(z, labels), [logits], [one])
    t_loss, (t_grad,) = grads_of(lambda z: ce_t.cross_entropy_reference(z, labels), [logits], [one])
    # fp64 reference in row chunks (the whole fp64 softmax would be 19 GB)
    ref_loss, err2, ref2, t_err2 = 0.0, 0.0, 0.0, 0.0
    for r0 in range(0, T, 2048):
        l64 = logits[r0 : r0 + 2048].double().requires_grad_()
        part = ce_t.cross_entropy_reference(l64, labels[r0 : r0 + 2048])
        (g64,) = torch.autograd.grad(part, [l64])
        ref_loss += part.item()
        err2 += (grad[r0 : r0 + 2048].double() - g64).pow(2).sum().item()
        t_err2 += (t_grad[r0 : r0 + 2048].double() - g64).pow(2).sum().item()
        ref2 += g64.pow(2).sum().item()
    ERRORS.append(dict(op="cross_entropy", output="loss", rel_err=abs(loss[0].item() - ref_loss) / abs(ref_loss),
                       torch_bf16_rel_err=abs(t_loss[0].item() - ref_loss) / abs(ref_loss)))  # fmt: skip
    ERRORS.append(dict(op="cross_entropy", output="d_logits", rel_err=math.sqrt(err2 / ref2),
                       torch_bf16_rel_err=math.sqrt(t_err2 / ref2), finite=bool(torch.isfinite(grad).all())))  # fmt: skip
    del grad, t_grad
    free()
    fwd_bytes = T * V * 2
    record("cross_entropy", "fwd", "triton", lambda: ce_t.cross_entropy_fwd(logits, labels), bytes_=fwd_bytes)
    call = lambda f: (lambda: f(logits, labels))  # noqa: E731
    record_baselines("cross_entropy", "fwd", ce_t.cross_entropy_reference, call, bytes_=fwd_bytes)
    fb = lambda f: (lambda: grads_of(lambda z: f(z, labels), [logits], [one]))  # noqa: E731
    record("cross_entropy", "fwd+bwd", "triton", fb(ce_t.cross_entropy), bytes_=3 * fwd_bytes)
    record_baselines("cross_entropy", "fwd+bwd", ce_t.cross_entropy_reference, fb, bytes_=3 * fwd_bytes)


def fused_linear_cross_entropy() -> None:
    """Output projection + loss + both gradients: chunked Triton fusion vs materialized logits."""
    hidden = randn(T, H, seed=15, scale=LOGIT_SCALE)
    weight = randn(V, H, seed=16, scale=3 / math.sqrt(H))
    labels = _labels(T, seed=17)
    ours = lambda x, w: ce_t.fused_linear_cross_entropy(x, w, labels, LOGIT_SCALE)[0]  # noqa: E731
    ref = lambda x, w: ce_t.cross_entropy_reference((x / LOGIT_SCALE) @ w.t(), labels)  # noqa: E731
    # errors on the first CE_CHECK_ROWS tokens (an fp64 reference of all T would need 19 GB of logits)
    n = CE_CHECK_ROWS
    sub = lambda x, w: ce_t.fused_linear_cross_entropy(x, w, labels[:n], LOGIT_SCALE, 1000)[0]  # noqa: E731
    sub_ref = lambda x, w: ce_t.cross_entropy_reference((x / LOGIT_SCALE) @ w.t(), labels[:n])  # noqa: E731
    one = torch.tensor(1.0, device=DEV)
    outs, grads = grads_of(sub, [hidden[:n], weight], [one])
    r_outs, r_grads = grads_of(sub_ref, [hidden[:n].double(), weight.double()], [one.double()])
    t_outs, t_grads = grads_of(sub_ref, [hidden[:n], weight], [one])
    for name, a, r, t in zip(["loss", "d_hidden", "d_weight"], outs + grads, r_outs + r_grads, t_outs + t_grads):
        check("fused_linear_ce", name, a, r, t)
    del r_outs, r_grads, t_outs, t_grads
    free()
    flops = 6 * T * H * V  # logits, d_hidden and d_weight GEMMs
    for impl, fn in [("triton fused, chunk 4096", ours), ("torch eager", ref), ("torch.compile", compiled(ref))]:
        if fn is None:
            ROWS.append(dict(op="fused_linear_ce", pass_="fwd+bwd", impl=impl, skipped="disabled or out of time"))
            continue
        call = lambda f=fn: grads_of(f, [hidden, weight], [one])  # noqa: E731
        call()
        free()
        base = torch.cuda.memory_allocated() if DEV == "cuda" else 0
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        call()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if DEV == "cuda" else 0.0
        record("fused_linear_ce", "fwd+bwd", impl, call, flops=flops)
        ROWS[-1]["extra_peak_GiB"] = round(peak, 2)
        free()


def _param_shapes() -> list[tuple[tuple[int, ...], float]]:
    """MiniCPM4-0.5B's parameters (tied embedding) with their weight decay (0 for norm weights)."""
    nd, gd = NQ * D, NKV * D
    layer = [(nd, H), (gd, H), (gd, H), (H, nd), (FF, H), (FF, H), (H, FF), (H,), (H,)]
    shapes = [(V, H)] + layer * LAYERS + [(H,)]
    return [(s, 0.1 if len(s) == 2 else 0.0) for s in shapes]


def adamw() -> None:
    shapes = _param_shapes()
    numel = sum(math.prod(s) for s, _ in shapes)
    decays = [wd for _, wd in shapes]
    master = [randn(*s, seed=100 + i, scale=0.02, dtype=torch.float32) for i, (s, _) in enumerate(shapes)]
    grads = [randn(*s, seed=200 + i, scale=1e-3) for i, (s, _) in enumerate(shapes)]  # bf16, as autograd gives
    m = [torch.zeros_like(p) for p in master]
    v = [torch.zeros_like(p) for p in master]
    copies = [torch.empty_like(p, dtype=BF16) for p in master]
    hp = dict(beta1=0.9, beta2=0.95, eps=1e-8)

    def ours(step: int = 1):
        norm = adamw_t.grad_sq_sum(grads).sqrt()
        adamw_t.adamw(master, grads, m, v, step=step, lr=1e-3, **hp, weight_decays=decays, param_copies=copies,
                      clip_coef=clip_coefficient(norm, 1.0))  # fmt: skip
        return norm

    # correctness: one step against fp64 on the embedding and the first layer (the norm on all grads)
    k = 1 + 9
    p64, m64, v64 = ([t.double() for t in ts[:k]] for ts in (master, m, v))
    before = [t.clone() for t in p64]
    g64 = [g.double() for g in grads]
    norm = ours()
    norm64 = adamw_t.grad_sq_sum_reference(g64).sqrt()
    adamw_t.adamw_reference(p64, g64[:k], m64, v64, step=1, lr=1e-3, **hp, weight_decays=decays[:k],
                            clip_coef=clip_coefficient(norm64, 1.0))  # fmt: skip
    ERRORS.append(dict(op="adamw", output="grad_norm", rel_err=abs(norm.item() - norm64.item()) / norm64.item()))
    cat = lambda ts: torch.cat([t.reshape(-1).double() for t in ts])  # noqa: E731
    check("adamw", "exp_avg", cat(m[:k]), cat(m64))
    check("adamw", "exp_avg_sq", cat(v[:k]), cat(v64))
    check("adamw", "update p_new - p_old", cat(master[:k]) - cat(before), cat(p64) - cat(before))
    same = all(torch.equal(c, p.to(BF16)) for c, p in zip(copies, master))
    ERRORS.append(dict(op="adamw", output="bf16 copies == masters rounded", value=same))
    del p64, m64, v64, g64, before
    free()
    ours_bytes = numel * (2 + 2 + 12 + 12 + 2)  # norm read (bf16 g); g, p, m, v read; p, m, v, copy written
    record("adamw+clip+copy", "step", "triton (norm pass + one update pass)", ours, bytes_=ours_bytes)
    # baselines: fp32 gradients (one bf16 -> fp32 pass not counted), clip_grad_norm_, optimizer, bf16 copy
    grads32 = [g.float() for g in grads]
    params = [torch.nn.Parameter(p.clone()) for p in master]
    for p, g in zip(params, grads32):
        p.grad = g
    groups = [dict(params=[p for p, wd in zip(params, decays) if wd], weight_decay=0.1),
              dict(params=[p for p, wd in zip(params, decays) if not wd], weight_decay=0.0)]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=not ARGS.smoke)

    def torch_fused():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        torch._foreach_copy_(copies, [p.detach() for p in params])

    def engine_foreach(step=[0]):  # noqa: B006  (a step counter)
        step[0] += 1
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        ps = [p.detach() for p in params]
        adamw_foreach.adamw(ps, grads32, m, v, step=step[0], lr=1e-3, **hp, weight_decays=decays)
        torch._foreach_copy_(copies, [p.detach() for p in params])

    baseline_bytes = numel * (4 + 4 + 4 + 16 + 12 + 2)  # norm read, clip rw, adam rw, copy (approx.)
    for impl, fn in [("torch.optim.AdamW(fused) + clip_grad_norm_ + copy", torch_fused),
                     ("engine ops/adamw/foreach + clip_grad_norm_ + copy", engine_foreach)]:  # fmt: skip
        record("adamw+clip+copy", "step", impl, fn, bytes_=baseline_bytes)
    ROWS.append(dict(op="adamw+clip+copy", note=f"{numel / 1e6:.1f} M parameters in {len(shapes)} tensors"))


def tuning() -> None:
    """A few launch settings around the defaults, for whoever tunes next (the defaults are not changed)."""
    if left() < 45:
        ROWS.append(dict(op="tuning", note="skipped: out of time"))
        return
    logits, labels = randn(T // 4, V, seed=18, scale=3), _labels(T // 4, seed=19)
    default = ce_t._launch_config
    try:
        for block, warps in [(2048, 4), (4096, 8), (8192, 8), (8192, 16)]:
            ce_t._launch_config = lambda V_, b=block, w=warps: dict(BLOCK_V=min(b, triton.next_power_of_2(V_)), num_warps=w)
            fwd = lambda: ce_t.cross_entropy_fwd(logits, labels)  # noqa: E731
            record("tune: ce fwd T/4", "fwd", f"BLOCK_V {block}, {warps} warps", fwd, bytes_=logits.numel() * 2)
    finally:
        ce_t._launch_config = default
    del logits
    x, dout = randn(T, H, seed=20), randn(T, H, seed=21)
    w = randn(H, seed=22)
    _, _, rstd = norm_t.rms_norm_fwd(x, w, EPS)
    default_programs = norm_t._PROGRAMS_PER_SM
    try:
        for per_sm in (4, 8, 16):
            norm_t._PROGRAMS_PER_SM = per_sm
            bwd = lambda: norm_t.rms_norm_bwd(dout, x, w, rstd)  # noqa: E731
            record("tune: rms_norm bwd", "bwd", f"{per_sm} programs per SM", bwd, bytes_=3 * T * H * 2)
    finally:
        norm_t._PROGRAMS_PER_SM = default_programs


def run_tests(marker: str, reserve: float) -> dict:
    """pytest -m MARKER tests/ops on this device, within the budget less `reserve` seconds."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, "tests/ops"]
    timeout = min(110.0, left() - reserve)
    if timeout < 20:
        return dict(cmd=" ".join(cmd), rc=None, tail=["skipped: out of time"])
    try:
        res = subprocess.run(cmd, cwd=ENGINE, capture_output=True, text=True, timeout=timeout)
        return dict(cmd=" ".join(cmd), rc=res.returncode, tail=(res.stdout + res.stderr).strip().splitlines()[-12:])
    except subprocess.TimeoutExpired:
        return dict(cmd=" ".join(cmd), rc=None, tail=[f"timed out after {timeout:.0f} s"])


def print_table(tests: dict) -> None:
    print("\n== op tests (pytest tests/ops on this device) ==")
    for marker, run in tests.items():
        print(f"-m '{marker}': rc {run['rc']}\n  " + "\n  ".join(run["tail"]))
    print("\n== errors vs fp64 (norm-wise relative; torch_bf16 = the plain torch reference run in bf16) ==")
    for e in ERRORS:
        fields = [(k, v) for k, v in e.items() if k not in ("op", "output")]
        vals = "  ".join(f"{k}={v:.3e}" if isinstance(v, float) else f"{k}={v}" for k, v in fields)
        print(f"{e['op']:18s} {e['output']:34s} {vals}")
    print("\n== timings (median ms) ==")
    eager = {}  # (op, pass) -> the first torch row's time: the speedup baseline
    for r in ROWS:
        if r.get("impl", "").startswith(("torch", "engine")) and "ms" in r:
            eager.setdefault((r["op"], r["pass_"]), (r["ms"], r["impl"].split(" + ")[0]))
    for r in ROWS:
        if "ms" not in r:
            what = r.get("skipped", r.get("note", ""))
            print(f"{r['op']:18s} {r.get('pass_', ''):8s} {r.get('impl', '')[:52]:52s} {what}")
            continue
        rate = f"{r['GB/s']:8.0f} GB/s" if "GB/s" in r else f"{r.get('TFLOP/s', 0):7.1f} TFLOP/s"
        base = eager.get((r["op"], r["pass_"]))
        speed = f"x{base[0] / r['ms']:.2f} vs {base[1]}" if base else ""
        extra = f" peak +{r['extra_peak_GiB']} GiB" if "extra_peak_GiB" in r else ""
        print(f"{r['op']:18s} {r['pass_']:8s} {r['impl'][:52]:52s} {r['ms']:9.3f} ms {rate} {speed}{extra}")


def main() -> None:
    if not ARGS.smoke and not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA device (or --smoke for a CPU dry run)")
    # the gpu-marked tests (bf16, production-sized) first; the fp32 edge-shape tests, now through the
    # compiled kernels, last, with the time that is left
    tests = {"gpu": run_tests("gpu", reserve=100)} if ARGS.tests != "none" else {}
    sections = {}
    for name, fn in [("swiglu", swiglu), ("rmsnorm", rmsnorm), ("rope", rope), ("cross_entropy", cross_entropy),
                     ("fused_linear_ce", fused_linear_cross_entropy), ("adamw", adamw), ("tuning", tuning)]:  # fmt: skip
        t0 = time.monotonic()
        try:
            fn()
            sections[name] = dict(ok=True, seconds=round(time.monotonic() - t0, 1))
        except Exception as e:  # one op's failure must not hide the others' numbers
            sections[name] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
            print(f"!! {name}: {type(e).__name__}: {e}", file=sys.stderr)
        free()
    if ARGS.tests == "all":
        tests["not gpu"] = run_tests("not gpu", reserve=5)
    report = dict(
        device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", torch=torch.__version__,
        triton=triton.__version__, shapes=dict(tokens=T, hidden=H, ffn=FF, vocab=V, heads=NQ, kv_heads=NKV, head_dim=D),
        tests=tests, sections=sections, errors=ERRORS, timings=ROWS, seconds=round(time.monotonic() - START, 1),
    )  # fmt: skip
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(report, indent=1))
    print_table(tests)
    print(f"\nsections: {sections}\nwrote {out / 'kernels.json'} in {report['seconds']} s")


if __name__ == "__main__":
    main()
