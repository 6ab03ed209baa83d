"""GradReducer on one process: fp32 slots hold the sum of the step's micro-batch gradients, the first
gradient of a step overwrites what the last step left (zero() writes nothing), and a parameter that got
no gradient reads zero after finish()."""

from __future__ import annotations

import torch
from torch import nn

from .core_testlib import engine_import

DistContext, GradReducer = engine_import("core.dist", "DistContext", "GradReducer")


def test_slots_sum_micro_batches_and_restart_each_step():
    torch.manual_seed(0)
    a, b, unused = (nn.Parameter(torch.randn(3, 4, dtype=torch.bfloat16)) for _ in range(3))
    reducer = GradReducer({"a": a, "b": b, "unused": unused}, DistContext(), torch.float32, bucket_mb=1e-5)
    assert len(reducer.buckets) > 1  # tiny buckets: slots in several buffers
    reducer.grads["unused"].fill_(7.0)  # stale values from an earlier step
    for step in range(2):
        reducer.zero()
        xs = [torch.randn(4, dtype=torch.bfloat16) for _ in range(2)]
        for x in xs:  # two micro batches
            ((a @ x).sum() * 2 + (b @ x).square().sum()).backward()
            assert a.grad is None and b.grad is None  # handed to the fp32 slots at once
        reducer.finish()
        want_a = sum(2 * x.float().expand(3, 4) for x in xs)
        want_b = sum(2 * (b.detach() @ x).float()[:, None] * x.float()[None, :] for x in xs)
        torch.testing.assert_close(reducer.grads["a"], want_a, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(reducer.grads["b"], want_b, rtol=2e-2, atol=2e-2)
        assert reducer.grads["a"].dtype == torch.float32
        assert torch.equal(reducer.grads["unused"], torch.zeros(3, 4))
