"""Triton RMSNorm and residual-add + RMSNorm (ops/rmsnorm/triton_fused.py) against an fp64 reference:
outputs, the residual stream, and the gradients of x, y and the weight; odd shapes; poisoned buffers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from train_engine_0_5b.ops.rmsnorm.triton_fused import (  # noqa: E402
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_bwd,
    rms_norm_fwd,
    rms_norm_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")]
EPS = 1e-6
SCALE = 1.4 / 24**0.5  # MiniCPM4-0.5B's residual scale
# Bounds against fp64 on the same inputs, relative to the largest reference element (gradients of a
# normalization mix a whole row, so a per-element relative bound would be meaningless near zero).
# bf16: the forward rounds like the reference does (up to ~2 ulps); gradients see the rounded stream.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=GPU)]
# rows x h: one row, h not a power of two, production h, 3-D input, h above 1024
SHAPES = [(1, 8), (127, 300), (64, 1024), (2, 3, 1030)]


def _randn(shape, gen, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)


def _close(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    err = (actual.double() - expected).abs().max().item()
    bound = TOL[dtype] * expected.abs().max().item()
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


def _fp64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_fp64(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x, dout = _randn(shape, gen, dtype, 2.0), _randn(shape, gen, dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype)  # not ones: dw must matter
    x.requires_grad_()
    w.requires_grad_()
    out = rms_norm(x, w, EPS)
    out.backward(dout)
    x64, w64 = _fp64(x, w)
    ref = rms_norm_reference(x64, w64, EPS)
    ref.backward(dout.double())
    _close(out, ref.detach(), dtype)
    _close(x.grad, x64.grad, dtype)
    _close(w.grad, w64.grad, dtype)


@pytest.mark.parametrize("use_new_x", [True, False], ids=["dnewx", "no-dnewx"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_matches_fp64(shape, dtype, use_new_x):
    gen = torch.Generator().manual_seed(100 + sum(shape))
    x, y = _randn(shape, gen, dtype, 2.0), _randn(shape, gen, dtype, 3.0)
    dout, dnew = _randn(shape, gen, dtype), _randn(shape, gen, dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype)
    x.requires_grad_()
    y.requires_grad_()
    w.requires_grad_()
    out, new_x = add_rms_norm(x, y, w, EPS, SCALE)
    # new_x also feeds the residual path (the next layer's add) unless it is the last use
    torch.autograd.backward([out, new_x] if use_new_x else [out], [dout, dnew] if use_new_x else [dout])
    x64, y64, w64 = _fp64(x, y, w)
    ref_out, ref_new = add_rms_norm_reference(x64, y64, w64, EPS, SCALE)
    torch.autograd.backward(
        [ref_out, ref_new] if use_new_x else [ref_out], [dout.double(), dnew.double()] if use_new_x else [dout.double()]
    )
    _close(out, ref_out.detach(), dtype)
    _close(new_x, ref_new.detach(), dtype)
    _close(x.grad, x64.grad, dtype)
    _close(y.grad, y64.grad, dtype)
    _close(w.grad, w64.grad, dtype)


def test_poisoned_buffers_are_overwritten():
    gen = torch.Generator().manual_seed(5)
    rows, h = 37, 515
    x, y, dout, dnew = (_randn((rows, h), gen, torch.float32) for _ in range(4))
    w = _randn(h, gen, torch.float32)
    out, new_x = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _, _, rstd = rms_norm_fwd(x, w, EPS, y=y, residual_scale=SCALE, out=out, new_x=new_x)
    dx, dy = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _, _, dw = rms_norm_bwd(dout, new_x, w, rstd, dnew_x=dnew, residual_scale=SCALE, dx=dx, dy=dy)
    x64, y64, w64 = _fp64(x, y, w)
    ref_out, ref_new = add_rms_norm_reference(x64, y64, w64, EPS, SCALE)
    torch.autograd.backward([ref_out, ref_new], [dout.double(), dnew.double()])
    pairs = [(out, ref_out.detach()), (new_x, ref_new.detach()), (dx, x64.grad), (dy, y64.grad), (dw, w64.grad)]
    for got, ref in pairs:
        assert torch.isfinite(got).all()
        _close(got, ref, torch.float32)
    ref_rstd = torch.rsqrt(ref_new.detach().pow(2).mean(-1) + EPS)
    torch.testing.assert_close(rstd.double(), ref_rstd, rtol=1e-6, atol=0)


def test_more_rows_than_programs_split_evenly():
    """dw is summed per program over a contiguous row range: a row count that is not a multiple of the
    program count leaves a short last range (and possibly programs with no rows)."""
    gen = torch.Generator().manual_seed(9)
    x, dout = _randn((13, 40), gen, torch.float32), _randn((13, 40), gen, torch.float32)
    w = _randn(40, gen, torch.float32)
    _, _, rstd = rms_norm_fwd(x, w, EPS)
    _, _, dw = rms_norm_bwd(dout, x, w, rstd)
    x64, w64 = _fp64(x, w)
    rms_norm_reference(x64, w64, EPS).backward(dout.double())
    _close(dw, w64.grad, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")
def test_bf16_rounds_like_the_reference():
    """new_x is the reference's `x + y * s` bit for bit; out agrees bit for bit almost everywhere (the
    fp32 sum of squares is ordered differently, which can flip a last bit)."""
    gen = torch.Generator().manual_seed(13)
    x, y = _randn((8192, 1024), gen, torch.bfloat16, 2.0), _randn((8192, 1024), gen, torch.bfloat16)
    w = (1 + 0.5 * torch.randn(1024, generator=gen)).to(DEVICE, torch.bfloat16)
    out, new_x = add_rms_norm(x, y, w, EPS, SCALE)
    ref_out, ref_new = add_rms_norm_reference(x, y, w, EPS, SCALE)
    assert torch.equal(new_x, ref_new)
    same = (out == ref_out).float().mean().item()
    assert same > 0.99, same
