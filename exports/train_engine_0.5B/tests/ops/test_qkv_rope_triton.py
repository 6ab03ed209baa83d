"""The fused QKV projection + RoPE (ops/qkv_rope/triton_fused.py) against an fp64 reference: rotated q, k
and v, and the gradients of x and the three weights; GQA, MHA, one token, odd S, head dims whose half is
not a power of two; the packed passes on poisoned buffers; a gradient through only some outputs;
torch.compile; the trainer with it against the unfused path."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from train_engine_0_5b.ops.qkv_rope import reference, triton_fused  # noqa: E402
from train_engine_0_5b.ops.qkv_rope.triton_fused import qkv_rope, rotate_packed, unrotate_to_packed  # noqa: E402
from train_engine_0_5b.ops.rope.reference import rope_tables  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")]
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=GPU)]
# Bound on ||got - fp64|| / ||fp64|| per tensor: fp32 differs in summation order only; bf16 rounds the
# inputs, the tables, the GEMM output and the rotated values (each ~2^-9 relative).
REL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}
# (B, S, h, n, g, d): one token, odd S with GQA 8:1, MHA with d 6 (half 3), half 40 (not a power of two)
SHAPES = [(1, 1, 8, 1, 1, 2), (2, 37, 48, 16, 2, 64), (1, 5, 12, 3, 3, 6), (3, 9, 40, 4, 1, 80)]
THETA = 10000.0


def _rel(got, want) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _inputs(B, S, h, n, g, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, h, generator=gen)
    ws = [torch.randn(o, h, generator=gen) * h**-0.5 for o in (n * d, g * d, g * d)]
    douts = [torch.randn(B, S, heads, d, generator=gen) for heads in (n, g, g)]
    return [t.to(DEVICE, dtype) for t in (x, *ws)], [t.to(DEVICE, dtype) for t in douts]


def _fp64(inputs, douts, S, d):
    """Outputs and gradients of (x, wq, wk, wv) from the reference op in fp64 with fp64 tables."""
    x, *ws = (t.detach().double().requires_grad_() for t in inputs)
    cos, sin = rope_tables(S, d, THETA, device=DEVICE, dtype=torch.float64)
    outs = reference.qkv_rope(x, tuple(ws), cos, sin)
    torch.autograd.backward(outs, [g.double() for g in douts])
    return [o.detach() for o in outs], [x.grad, *(w.grad for w in ws)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_qkv_rope_matches_fp64(shape, dtype):
    B, S, h, n, g, d = shape
    inputs, douts = _inputs(*shape, dtype, seed=sum(shape))
    inputs = [t.requires_grad_() for t in inputs]
    cos, sin = rope_tables(S + 3, d, THETA, device=DEVICE, dtype=dtype)  # longer than S: rows by position
    x, *ws = inputs
    outs = qkv_rope(x, tuple(ws), cos, sin)
    assert [tuple(o.shape) for o in outs] == [(B, S, n, d), (B, S, g, d), (B, S, g, d)]
    assert all(o.dtype == dtype and o.is_contiguous() for o in outs)
    torch.autograd.backward(outs, douts)
    want_outs, want_grads = _fp64(inputs, douts, S, d)
    for got, want in zip([*outs, *(t.grad for t in inputs)], [*want_outs, *want_grads]):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert _rel(got, want) <= REL[dtype]


def test_packed_passes_fill_poisoned_buffers_and_invert_each_other():
    """rotate_packed writes every element of NaN-filled q / k / v buffers (values = the reference's
    rotation of the packed row's parts); unrotate_to_packed writes a NaN-filled packed buffer and, the
    rotation being orthogonal, returns the packed input."""
    B, S, n, g, d = 2, 11, 4, 2, 16
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, S, (n + 2 * g) * d, generator=gen).to(DEVICE)
    cos, sin = rope_tables(S, d, THETA, device=DEVICE, dtype=torch.float32)
    out = tuple(torch.full(shape, float("nan"), device=DEVICE) for shape in ((B, S, n, d), (B, S, g, d), (B, S, g, d)))
    q, k, v = rotate_packed(qkv, cos, sin, n, g, out=out)
    assert all(a is b for a, b in zip((q, k, v), out)) and all(torch.isfinite(t).all() for t in out)
    parts = qkv.view(B, S, n + 2 * g, d).split([n, g, g], dim=2)
    rq, rk = reference.rope(parts[0], parts[1], cos, sin)
    torch.testing.assert_close(q, rq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-6)
    assert torch.equal(v, parts[2])
    packed = torch.full_like(qkv, float("nan"))
    assert unrotate_to_packed(q, k, v, cos, sin, out=packed) is packed
    torch.testing.assert_close(packed, qkv, rtol=1e-5, atol=1e-6)


def test_gradient_through_some_outputs_only():
    """Only q reaches the loss: the backward fills zeros for k and v, so wk and wv get zero gradients."""
    B, S, h, n, g, d = 1, 6, 16, 2, 1, 8
    inputs, douts = _inputs(B, S, h, n, g, d, torch.float32, seed=8)
    inputs = [t.requires_grad_() for t in inputs]
    cos, sin = rope_tables(S, d, THETA, device=DEVICE, dtype=torch.float32)
    q, _, _ = qkv_rope(inputs[0], tuple(inputs[1:]), cos, sin)
    q.backward(douts[0])
    zeros = [torch.zeros_like(t) for t in douts[1:]]
    _, want = _fp64(inputs, [douts[0], *zeros], S, d)
    for got, w in zip([t.grad for t in inputs], want):
        if w.abs().max() == 0:
            assert torch.equal(got, torch.zeros_like(got))
        else:
            assert _rel(got, w) <= REL[torch.float32]


@pytest.mark.parametrize("S, scale", [pytest.param(4096, 1.0, marks=pytest.mark.slow, id="S4096"),
                                      pytest.param(301, 1.25, id="S301-scaled")])
def test_longrope_tables(S, scale):
    """The released 0.5B config's per-frequency LongRoPE factors in the tables, at production length with its
    cos/sin scale (1) and at a CPU-cheap length with a scale != 1: outputs and the gradients of x and the three
    weights match the fp64 reference on fp64 tables (small heads and width: the CPU interpreter)."""
    from train_engine_0_5b.model_config import preset

    factors = preset("minicpm4-0.5b").rope_scaling.short_factor
    B, h, n, g, d = 1, 16, 2, 1, 2 * len(factors)
    inputs, douts = _inputs(B, S, h, n, g, d, torch.float32, seed=41)
    inputs = [t.requires_grad_() for t in inputs]
    cos, sin = rope_tables(S, d, THETA, factors, scale, device=DEVICE, dtype=torch.float32)
    outs = qkv_rope(inputs[0], tuple(inputs[1:]), cos, sin)
    torch.autograd.backward(outs, douts)
    x, *ws = (t.detach().double().requires_grad_() for t in inputs)
    c64, s64 = rope_tables(S, d, THETA, factors, scale, device=DEVICE, dtype=torch.float64)
    want = reference.qkv_rope(x, tuple(ws), c64, s64)
    torch.autograd.backward(want, [t.double() for t in douts])
    for got, w in zip([*outs, *(t.grad for t in inputs)], [*want, x.grad, *(w.grad for w in ws)]):
        assert _rel(got, w.detach()) <= REL[torch.float32]


def test_bad_shapes_fail_naming_the_op():
    x = torch.randn(1, 4, 8, device=DEVICE)
    cos, sin = rope_tables(4, 4, THETA, device=DEVICE, dtype=torch.float32)
    with pytest.raises(ValueError, match="qkv_rope: weights"):  # wk and wv differ
        qkv_rope(x, (torch.randn(8, 8), torch.randn(4, 8), torch.randn(8, 8)), cos, sin)
    with pytest.raises(ValueError, match="qkv_rope: tables"):  # fewer table rows than positions
        rotate_packed(torch.randn(1, 5, 12, device=DEVICE), cos, sin, 1, 1)
    with pytest.raises(ValueError, match="qkv_rope: packed width"):
        rotate_packed(torch.randn(1, 4, 16, device=DEVICE), cos, sin, 1, 1)


def test_qkv_rope_compiles_as_one_node_per_direction():
    """torch.compile(fullgraph=True) of a step around the op (a scale before, a reduction after) gives the
    eager values: no graph break, the custom ops traced through their fakes."""
    B, S, h, n, g, d = 2, 7, 24, 4, 2, 8
    inputs, _ = _inputs(B, S, h, n, g, d, torch.float32, seed=5)
    inputs = [t.requires_grad_() for t in inputs]
    cos, sin = rope_tables(S, d, THETA, device=DEVICE, dtype=torch.float32)

    def step(x, wq, wk, wv):
        q, k, v = qkv_rope(x * 0.5, (wq, wk, wv), cos, sin)
        return (q.square().sum() + (k * v).sum()) / 3

    loss = torch.compile(step, fullgraph=True)(*inputs)
    loss.backward()
    x64, *w64 = (t.detach().double().requires_grad_() for t in inputs)
    c64, s64 = rope_tables(S, d, THETA, device=DEVICE, dtype=torch.float64)
    q, k, v = reference.qkv_rope(x64 * 0.5, tuple(w64), c64, s64)
    ref = (q.square().sum() + (k * v).sum()) / 3
    ref.backward()
    assert _rel(loss.detach(), ref.detach()) <= 1e-5
    for got, want in zip([t.grad for t in inputs], [x64.grad, *(w.grad for w in w64)]):
        assert _rel(got, want) <= 1e-5


def test_qkv_rope_in_the_trainer_matches_unfused(monkeypatch):
    """The tiny model trained 2 steps of 2 micro batches with qkv_rope=triton_fused and with the unfused
    qkv GEMM + rope: the same losses, gradient norms and fp32 master weights (fp32; they differ in GEMM
    summation order only)."""
    from engine_testlib import assert_same_training, train_tiny
    from train_engine_0_5b.ops.registry import OPS

    monkeypatch.setitem(OPS["qkv_rope"], "triton_fused", triton_fused.qkv_rope)
    assert_same_training(train_tiny("qkv_rope=triton_fused", DEVICE), train_tiny("qkv_rope=unfused", DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")
def test_bf16_at_the_production_shape():
    """MiniCPM4-0.5B's attention input at sequence 4096 (angles up to 4095 rad): h 1024, GQA 16 / 2, d 64."""
    B, S, h, n, g, d = 2, 4096, 1024, 16, 2, 64
    inputs, douts = _inputs(B, S, h, n, g, d, torch.bfloat16, seed=21)
    inputs = [t.requires_grad_() for t in inputs]
    cos, sin = rope_tables(S, d, THETA, device=DEVICE, dtype=torch.bfloat16)
    outs = qkv_rope(inputs[0], tuple(inputs[1:]), cos, sin)
    torch.autograd.backward(outs, douts)
    want_outs, want_grads = _fp64(inputs, douts, S, d)
    for got, want in zip([*outs, *(t.grad for t in inputs)], [*want_outs, *want_grads]):
        assert torch.isfinite(got).all() and _rel(got, want) <= REL[torch.bfloat16]
