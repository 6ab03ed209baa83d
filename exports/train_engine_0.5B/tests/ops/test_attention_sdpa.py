"""ops/attention/sdpa.py against ops/attention/reference.py: outputs and the q, k, v gradients on
odd shapes, GQA ratios 1, 3 and n (one kv head), fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import rel_err

from train_engine_0_5b.ops.attention import reference, sdpa

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # max |got - want| / max |want|
SHAPES = [(1, 1, 2, 2, 8), (2, 37, 6, 2, 16), (3, 5, 4, 4, 8), (1, 64, 6, 1, 32)]  # (B, S, n, g, d)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_matches_reference(shape, dtype):
    B, S, n, g, d = shape
    q = torch.randn(B, S, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, g, d, dtype=dtype, requires_grad=True)
    v = torch.randn(B, S, g, d, dtype=dtype, requires_grad=True)
    dout = torch.randn(B, S, n, d, dtype=dtype)
    outs = []
    for impl in (reference.attention, sdpa.attention):
        out = impl(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        outs.append((out, *grads))
    assert outs[0][0].shape == (B, S, n, d)
    for want, got in zip(*outs):
        assert got.shape == want.shape and rel_err(want, got) <= TOL[dtype], rel_err(want, got)
