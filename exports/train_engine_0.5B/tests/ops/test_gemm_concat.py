"""ops/gemm/concat.py against ops/gemm/reference.py: one, two and three weights (attn-out / fc1 / qkv
sites), odd sizes, outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import rel_err

from train_engine_0_5b.ops.gemm import concat, reference

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # max |got - want| / max |want|


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("outs", [(33,), (48, 48), (40, 8, 8), (1, 1, 1)])
def test_concat_matches_reference(outs, dtype):
    x = torch.randn(3, 7, 24, dtype=dtype, requires_grad=True)
    ws = [torch.randn(o, 24, dtype=dtype, requires_grad=True) for o in outs]
    douts = [torch.randn(3, 7, o, dtype=dtype) for o in outs]
    results = []
    for impl in (reference.gemm, concat.gemm):
        ys = impl(x, tuple(ws))
        assert [y.shape[-1] for y in ys] == list(outs)
        grads = torch.autograd.grad(ys, (x, *ws), douts)
        results.append((*ys, *grads))
    for want, got in zip(*results):
        assert got.shape == want.shape and rel_err(want, got) <= TOL[dtype], rel_err(want, got)
