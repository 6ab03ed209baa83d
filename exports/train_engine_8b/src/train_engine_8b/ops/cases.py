"""One call of an op at given dimensions, on fresh random inputs: what `bench --op-table`, the op tests and the
gates' per-op harness run. `build(op, dims, ...)` returns a `Call`; `Call.run(fn)` runs implementation `fn` once
(forward, then backward against output gradients drawn once; AdamW: one step on copies of its state) and returns
every output and gradient, so two implementations compare tensor by tensor. `flops` / `bytes` are the call's
work for a roofline (forward + backward; matmuls 2 FLOPs per multiply-add, causal attention halved).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .rope.reference import rope_tables


@dataclass(frozen=True)
class Dims:
    """The shapes an op sees: tokens as (batch, seq), the model's widths."""

    batch: int
    seq: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float = 1e-5
    residual_scale: float = 0.29
    params: tuple[tuple[int, ...], ...] = ((64, 48), (48,), (1000,))  # AdamW's tensors

    @classmethod
    def of_model(cls, cfg, batch: int, seq: int, params: tuple[tuple[int, ...], ...] | None = None) -> "Dims":
        """A model config's (model_config.MiniCPMConfig) dims at (batch, seq)."""
        return cls(batch, seq, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_head,
                   cfg.vocab_size, cfg.rms_norm_eps, cfg.residual_scale,
                   params if params is not None else ((cfg.vocab_size, cfg.hidden_size), (cfg.hidden_size,)))


# odd and boundary shapes: one token, rows not a multiple of any block, widths not powers of two
EDGE_DIMS: tuple[Dims, ...] = (
    Dims(1, 1, 40, 72, 2, 1, 20, 131, params=((3,), (5, 7))),
    Dims(2, 7, 96, 136, 6, 2, 16, 517, params=((33, 17), (1,), (1025,))),
)


@dataclass
class Call:
    """`run(fn)`: outputs then input gradients, on copies of the inputs (compare implementations with it);
    `timed(fn)`: a no-argument call of the same work on inputs made once (time it; AdamW steps its state again)."""

    run: Callable[[Callable], list[Tensor]]
    timed: Callable[[Callable], Callable[[], None]]
    flops: float
    bytes: float


def _fwd_bwd(inputs: list[Tensor], consts: tuple, gen: torch.Generator, adapt: Callable | None = None):
    """(run, timed) for fn(*inputs, *consts) (through `adapt` when the signature needs packing), then
    autograd.grad of its differentiable outputs against cotangents drawn on the first call."""
    douts: list[Tensor] = []

    def once(fn: Callable, xs: list[Tensor]) -> list[Tensor]:
        outs = (adapt or (lambda f, *a: f(*a)))(fn, *xs, *consts)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        diff = [o for o in outs if o.requires_grad]
        if not douts:
            douts.extend(torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype)
                         for o in diff)
        wrt = [x for x in xs if x.requires_grad]
        grads = torch.autograd.grad(diff, wrt, douts, allow_unused=True) if diff else ()
        return [o.detach() for o in outs] + [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, wrt)]

    def leaves() -> list[Tensor]:
        return [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]

    def timed(fn: Callable) -> Callable[[], None]:
        xs = leaves()
        return lambda: once(fn, xs) and None

    return (lambda fn: once(fn, leaves())), timed


def build(op: str, d: Dims, dtype: torch.dtype, device: torch.device | str, seed: int) -> Call:
    """A call of `op` (a table op; gemm sites as "gemm.qkv", ...) at `d` on inputs drawn from `seed`."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    T, h, f, V, n, g, hd = d.batch * d.seq, d.hidden, d.ffn, d.vocab, d.heads, d.kv_heads, d.head_dim
    size = torch.tensor([], dtype=dtype).element_size()

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    def labels() -> Tensor:
        y = torch.randint(0, V, (d.batch, d.seq), generator=gen, device=device)
        return y.masked_fill(torch.rand(y.shape, generator=gen, device=device) < 0.1, -100)  # some ignored

    def call(inputs: list[Tensor], consts: tuple, flops: float, adapt: Callable | None = None, out_elems: int = 0):
        # least traffic: forward reads the inputs and writes the outputs; backward reads the inputs and the outputs'
        # gradients and writes the inputs' gradients
        moved = sum(x.numel() for x in inputs if x.is_floating_point()) * 3 + out_elems * 2
        return Call(*_fwd_bwd(inputs, consts, gen, adapt), flops, moved * size)

    def gemm(in_f: int, *outs: int) -> Call:
        ws = [rand(o, in_f, scale=in_f**-0.5) for o in outs]
        return call([rand(d.batch, d.seq, in_f), *ws], (), 6 * T * in_f * sum(outs),
                    adapt=lambda fn, x, *w: fn(x, tuple(w)), out_elems=T * sum(outs))

    cos, sin = rope_tables(d.seq, hd, device=device, dtype=dtype)
    cases: dict[str, Callable[[], Call]] = {
        "attention": lambda: call([rand(d.batch, d.seq, n, hd), rand(d.batch, d.seq, g, hd), rand(d.batch, d.seq, g, hd)],
                                  (), 3.5 * 2 * 2 * d.batch * n * d.seq * d.seq * hd / 2, out_elems=T * n * hd),
        "rms_norm": lambda: call([rand(d.batch, d.seq, h), 1 + rand(h, scale=0.1)], (d.eps,), 0, out_elems=T * h),
        "add_rms_norm": lambda: call([rand(d.batch, d.seq, h), rand(d.batch, d.seq, h), 1 + rand(h, scale=0.1)],
                                     (d.eps, d.residual_scale), 0, out_elems=2 * T * h),
        "rope": lambda: call([rand(d.batch, d.seq, n, hd), rand(d.batch, d.seq, g, hd)], (cos, sin), 0,
                             out_elems=T * (n + g) * hd),
        "qkv_rope": lambda: call([rand(d.batch, d.seq, h), *(rand(o, h, scale=h**-0.5) for o in (n * hd, g * hd, g * hd))],
                                 (cos, sin), 6 * T * h * (n + 2 * g) * hd,
                                 adapt=lambda fn, x, wq, wk, wv, c, s: fn(x, (wq, wk, wv), c, s),
                                 out_elems=T * (n + 2 * g) * hd),
        "swiglu": lambda: call([rand(d.batch, d.seq, f), rand(d.batch, d.seq, f)], (), 0, out_elems=T * f),
        "mlp": lambda: call([rand(d.batch, d.seq, h), rand(f, h, scale=h**-0.5), rand(f, h, scale=h**-0.5),
                             rand(h, f, scale=f**-0.5)], (), 18 * T * h * f, out_elems=T * h),
        "cross_entropy": lambda: call([rand(d.batch, d.seq, V, scale=3.0)], (labels(),), 0),
        "linear_cross_entropy": lambda: call([rand(d.batch, d.seq, h), rand(V, h, scale=3 * h**-0.5)], (labels(),),
                                             6 * T * h * V),
        "residual_scale": lambda: call([rand(h, n * hd)], (d.residual_scale,), 0, out_elems=h * n * hd),
        "gemm.qkv": lambda: gemm(h, n * hd, g * hd, g * hd),
        "gemm.attn_out": lambda: gemm(n * hd, h),
        "gemm.fc1": lambda: gemm(h, f, f),
        "gemm.fc2": lambda: gemm(f, h),
        "gemm.output": lambda: gemm(h, V),
    }
    if op == "adamw":
        return _adamw(d, device, gen)
    if op == "gemm":
        op = "gemm.fc2"
    return cases[op]()


def _adamw(d: Dims, device: torch.device, gen: torch.Generator) -> Call:
    params = [torch.randn(s, generator=gen, device=device).mul_(0.02) for s in d.params]  # fp32 masters
    grads = [torch.randn(s, generator=gen, device=device).mul_(1e-3) for s in d.params]
    m = [torch.randn(s, generator=gen, device=device).mul_(1e-4) for s in d.params]
    v = [torch.rand(s, generator=gen, device=device).mul_(1e-6) for s in d.params]
    decays = [0.1 if len(s) >= 2 else 0.0 for s in d.params]

    def step(fn: Callable, p: list[Tensor], mm: list[Tensor], vv: list[Tensor]) -> list[Tensor]:
        fn(p, grads, mm, vv, step=3, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decays=decays)
        return p + mm + vv

    def copies() -> list[list[Tensor]]:
        return [[t.clone() for t in ts] for ts in (params, m, v)]

    def timed(fn: Callable) -> Callable[[], None]:
        state = copies()
        return lambda: step(fn, *state) and None

    elems = sum(math.prod(s) for s in d.params)
    return Call(lambda fn: step(fn, *copies()), timed, 12.0 * elems, 4.0 * elems * 7)  # reads p, g, m, v; writes p, m, v
