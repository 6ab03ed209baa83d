"""Triton SwiGLU (ops/swiglu/triton_fused.py) against an fp64 reference: outputs and both gradients,
separate and fused (gate|up) inputs, odd shapes, poisoned output buffers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from train_engine_0_5b.ops.swiglu.triton_fused import (  # noqa: E402
    swiglu,
    swiglu_bwd,
    swiglu_fused,
    swiglu_fused_reference,
    swiglu_fwd,
    swiglu_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")]
# Error bounds against fp64 on the same inputs: fp32 is a few ulps; bf16 allows the reference's double
# rounding (silu rounded, then the product) plus one, i.e. about 2 bf16 ulps.
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=GPU)]
# (rows..., f): a single element, f below / not a multiple of / above the 1024-column block, 3-D input
SHAPES = [(1, 1), (127, 300), (5, 1030), (2, 3, 2049)]


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)  # wide enough to reach sigmoid's tails
    up = torch.randn(shape, generator=g).to(DEVICE, dtype)
    dout = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return gate, up, dout


def _ref(gate, up, dout):
    g64 = gate.double().requires_grad_()
    u64 = up.double().requires_grad_()
    out = swiglu_reference(g64, u64)
    out.backward(dout.double())
    return out.detach(), g64.grad, u64.grad


def _close(actual, expected, dtype):
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_fp64(shape, dtype):
    gate, up, dout = _inputs(shape, dtype, seed=sum(shape))
    gate.requires_grad_()
    up.requires_grad_()
    out = swiglu(gate, up)
    out.backward(dout)
    ref_out, ref_dg, ref_du = _ref(gate.detach(), up.detach(), dout)
    _close(out, ref_out, dtype)
    _close(gate.grad, ref_dg, dtype)
    _close(up.grad, ref_du, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_fused_matches_fp64(shape, dtype):
    gate, up, dout = _inputs(shape, dtype, seed=7 + sum(shape))
    gate_up = torch.cat([gate, up], dim=-1).requires_grad_()
    out = swiglu_fused(gate_up)
    out.backward(dout)
    ref_out, ref_dg, ref_du = _ref(gate, up, dout)
    _close(out, ref_out, dtype)
    _close(gate_up.grad, torch.cat([ref_dg, ref_du], dim=-1), dtype)
    # the plain-torch fused reference agrees with the separate one
    torch.testing.assert_close(swiglu_fused_reference(gate_up.detach().double()), ref_out)


def test_poisoned_buffers_are_overwritten():
    gate, up, dout = _inputs((33, 1500), torch.float32, seed=3)
    out = torch.full_like(gate, float("nan"))
    swiglu_fwd(gate, up, out=out)
    grads = torch.full((33, 3000), float("nan"), device=DEVICE)  # one (rows, 2f) buffer, written as two views
    swiglu_bwd(dout, gate, up, grads[:, :1500], grads[:, 1500:])
    ref_out, ref_dg, ref_du = _ref(gate, up, dout)
    assert torch.isfinite(out).all() and torch.isfinite(grads).all()
    _close(out, ref_out, torch.float32)
    _close(grads, torch.cat([ref_dg, ref_du], dim=-1), torch.float32)


def test_empty_input():
    gate = torch.randn(0, 64, device=DEVICE)
    assert swiglu_fwd(gate, gate.clone()).shape == (0, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")
def test_bf16_forward_rounds_like_the_reference():
    """The forward rounds silu(gate) before the product, as F.silu(g) * u does in bf16: nearly every
    element is bit-identical to the reference (the rest differ by the last bit of silu)."""
    gate, up, _ = _inputs((4097, 4096), torch.bfloat16, seed=11)
    same = (swiglu_fwd(gate, up) == swiglu_reference(gate, up)).float().mean().item()
    assert same > 0.99, same
