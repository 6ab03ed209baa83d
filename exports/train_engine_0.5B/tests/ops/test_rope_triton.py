"""Triton RoPE (ops/rope/triton_fused.py) against an fp64 reference: q and k outputs and gradients,
GQA head counts, odd head dims, strided layouts (fused qkv views, (B, heads, S, d) transposes), poisoned
output buffers."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
from train_engine_0_5b.ops.rope.reference import rope_tables  # noqa: E402
from train_engine_0_5b.ops.rope.triton_fused import rope, rope_reference, rope_rotate  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")]
# Against fp64 (fp64 tables, fp64 inputs of the same values); bf16: one rounding of the output.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-2)}
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=GPU)]
# (B, S, n, g, d): one token, odd S with GQA, production heads at small S, d/2 not a power of two
SHAPES = [(1, 1, 1, 1, 2), (2, 37, 16, 2, 64), (1, 5, 3, 3, 6), (3, 9, 4, 1, 80)]


def _inputs(B, S, n, g, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, n, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(B, S, g, d, generator=gen).to(DEVICE, dtype)
    dq = torch.randn(B, S, n, d, generator=gen).to(DEVICE, dtype)
    dk = torch.randn(B, S, g, d, generator=gen).to(DEVICE, dtype)
    return q, k, dq, dk


def _ref(q, k, dq, dk, S, d):
    cos, sin = rope_tables(S, d, device=DEVICE, dtype=torch.float64)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qo, ko = rope_reference(q64, k64, cos, sin)
    torch.autograd.backward([qo, ko], [dq.double(), dk.double()])
    return qo.detach(), ko.detach(), q64.grad, k64.grad


def _close(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope_matches_fp64(shape, dtype):
    B, S, n, g, d = shape
    q, k, dq, dk = _inputs(*shape, dtype, seed=sum(shape))
    cos, sin = rope_tables(S + 3, d, device=DEVICE)  # a longer table than S: rows are indexed by position
    q.requires_grad_()
    k.requires_grad_()
    qo, ko = rope(q, k, cos, sin)
    torch.autograd.backward([qo, ko], [dq, dk])
    ref = _ref(q, k, dq, dk, S, d)
    for got, want in zip([qo, ko, q.grad, k.grad], ref):
        _close(got, want, dtype)


def test_fused_qkv_views_and_head_major_layout():
    """q and k as views of one (B, S, (n + 2g) * d) projection output, and (B, heads, S, d) tensors
    passed transposed: the kernel follows the strides; outputs land in strided poisoned buffers."""
    B, S, n, g, d = 2, 11, 4, 2, 16
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, S, (n + 2 * g) * d, generator=gen).to(DEVICE).view(B, S, n + 2 * g, d)
    q, k = qkv[:, :, :n], qkv[:, :, n : n + g]
    cos, sin = rope_tables(S, d, device=DEVICE)
    out = torch.full((B, n + g, S, d), float("nan"), device=DEVICE)  # head-major, q heads then k heads
    q_out, k_out = out[:, :n].transpose(1, 2), out[:, n:].transpose(1, 2)
    rope_rotate(q, k, cos, sin, q_out=q_out, k_out=k_out)
    assert torch.isfinite(out).all()
    zeros = torch.zeros_like(q), torch.zeros_like(k)
    qo, ko, _, _ = _ref(q, k, *zeros, S, d)
    _close(q_out, qo, torch.float32)
    _close(k_out, ko, torch.float32)


def test_backward_inverts_forward():
    """Rotating by +theta and then by -theta (the backward) returns the input."""
    q, k, _, _ = _inputs(2, 13, 4, 2, 32, torch.float32, seed=4)
    cos, sin = rope_tables(13, 32, device=DEVICE)
    back = rope_rotate(*rope_rotate(q, k, cos, sin), cos, sin, backward=True)
    torch.testing.assert_close(back[0], q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back[1], k, rtol=1e-5, atol=1e-6)


def test_gradient_of_one_output_only():
    q, k, dq, _ = _inputs(1, 6, 2, 1, 8, torch.float32, seed=8)
    cos, sin = rope_tables(6, 8, device=DEVICE)
    q.requires_grad_()
    k.requires_grad_()
    qo, _ = rope(q, k, cos, sin)
    qo.backward(dq)
    _, _, ref_dq, _ = _ref(q, k, dq, torch.zeros_like(k), 6, 8)
    _close(q.grad, ref_dq, torch.float32)
    assert torch.equal(k.grad, torch.zeros_like(k))


# The released 0.5B config's LongRoPE factors: at production length with its cos/sin scale (1), and the scale
# a config with max_seq_length 4 x original_max_position_embeddings 4096 would give (at a CPU-cheap length).
LONGROPE_CASES = [pytest.param(4096, 1.0, marks=pytest.mark.slow, id="S4096"),
                  pytest.param(301, (1 + math.log(4) / math.log(4096)) ** 0.5, id="S301-scaled")]


@pytest.mark.parametrize("S, scale", LONGROPE_CASES)
def test_longrope_tables(S, scale):
    """Per-frequency factors and a cos/sin scale live in the tables: the kernel, forward and backward, matches
    the fp64 reference on fp64 LongRoPE tables at positions 0..S-1 (small heads: the CPU interpreter)."""
    from train_engine_0_5b.model_config import preset

    factors = preset("minicpm4-0.5b").rope_scaling.short_factor
    B, n, g, d = 1, 2, 1, 2 * len(factors)
    q, k, dq, dk = _inputs(B, S, n, g, d, torch.float32, seed=40)
    cos, sin = rope_tables(S, d, divisors=factors, scale=scale, device=DEVICE)
    cos64, sin64 = rope_tables(S, d, divisors=factors, scale=scale, device=DEVICE, dtype=torch.float64)
    q.requires_grad_()
    k.requires_grad_()
    qo, ko = rope(q, k, cos, sin)
    torch.autograd.backward([qo, ko], [dq, dk])
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    want = rope_reference(q64, k64, cos64, sin64)
    torch.autograd.backward(list(want), [dq.double(), dk.double()])
    for got, w in zip([qo, ko, q.grad, k.grad], [*want, q64.grad, k64.grad]):
        _close(got, w.detach(), torch.float32)


def test_longrope_tables_divide_each_frequency():
    """Table row p, column i is cos / sin of p * theta^(-2i/d) / factor[i], times the scale."""
    factors = [1.0, 2.5, 7.0, 49.85]
    cos, sin = rope_tables(300, 8, 500.0, divisors=factors, scale=1.25, device=DEVICE, dtype=torch.float64)
    pos = torch.arange(300, dtype=torch.float64, device=DEVICE)[:, None]
    freq = torch.tensor([500.0 ** (-i / 8) / f for i, f in zip(range(0, 8, 2), factors)], dtype=torch.float64)
    torch.testing.assert_close(cos, 1.25 * torch.cos(pos * freq.to(DEVICE)).repeat(1, 2))
    torch.testing.assert_close(sin, 1.25 * torch.sin(pos * freq.to(DEVICE)).repeat(1, 2))


def test_tables_match_the_reference_math():
    cos, sin = rope_tables(50, 64, device=DEVICE, dtype=torch.float64)
    pos = torch.arange(50, dtype=torch.float64, device=DEVICE)[:, None]
    freq = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64, device=DEVICE) / 64)
    torch.testing.assert_close(cos[:, :32], torch.cos(pos * freq))
    torch.testing.assert_close(sin[:, 32:], torch.sin(pos * freq))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")
def test_bf16_at_sequence_4096():
    """Production positions (angles up to 4095 rad), GQA 16/2, d 64, bf16."""
    q, k, dq, dk = _inputs(2, 4096, 16, 2, 64, torch.bfloat16, seed=21)
    cos, sin = rope_tables(4096, 64, device=DEVICE)
    q.requires_grad_()
    k.requires_grad_()
    qo, ko = rope(q, k, cos, sin)
    torch.autograd.backward([qo, ko], [dq, dk])
    for got, want in zip([qo, ko, q.grad, k.grad], _ref(q, k, dq, dk, 4096, 64)):
        _close(got, want, torch.bfloat16)
