"""ops/mlp/dswiglu.py: the interleaved SwiGLU gradient (Triton) against autograd of silu(gate) * up in fp64,
at odd sizes and a final partial block, a poisoned output buffer fully overwritten, and bad shapes refused.
CPU: the Triton interpreter in fp32 (tests/ops/conftest.py); GPU: also bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from train_engine_0_5b.ops.mlp import dswiglu  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")]
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=GPU)]
SHAPES = [(1, 1), (3, 7), (5, 1030), (2, 3, 513)]  # (..., f): one pair, odd, past one 1024-pair block, 3-D


def _want(preact: torch.Tensor, dpost: torch.Tensor) -> torch.Tensor:
    p = preact.double().requires_grad_()
    (F.silu(p[..., 0::2]) * p[..., 1::2]).backward(dpost.double())
    return p.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_autograd(shape, dtype):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    *lead, f = shape
    preact = (torch.randn(*lead, 2 * f, generator=gen) * 3).to(DEVICE, dtype)  # reaches sigmoid's tails
    dpost = torch.randn(*lead, f, generator=gen).to(DEVICE, dtype)
    out = torch.full_like(preact, float("nan"))  # poisoned: every element must be written
    got = dswiglu.launch(preact, dpost, out)
    assert got is out and not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), _want(preact, dpost), **TOL[dtype])
    torch.testing.assert_close(dswiglu.reference(preact, dpost).double(), _want(preact, dpost), **TOL[dtype])


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="interleaved pair"):
        dswiglu.launch(torch.randn(4, 6, device=DEVICE), torch.randn(4, 4, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 kernels need a CUDA device")
@pytest.mark.parametrize("tokens", [8 * 4096, 4097])  # the 0.5B step's micro batch; an odd token count
def test_production_shape_bf16(tokens):
    """MiniCPM4-0.5B's ffn 4096 in bf16, through the custom op (the path quack_gated's backward takes)."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    preact = (torch.randn(tokens, 2 * 4096, generator=gen, device="cuda") * 3).bfloat16()
    dpost = torch.randn(tokens, 4096, generator=gen, device="cuda").bfloat16()
    got = dswiglu.dswiglu(preact, dpost)
    torch.testing.assert_close(got.double(), _want(preact, dpost), **TOL[torch.bfloat16])
