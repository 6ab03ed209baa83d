"""runtime.setup's numerics: deterministic algorithms on when asked; torch's NaN fill of new tensors only for the
probes (a read of unwritten memory then shows as NaN in the gates), not for a deterministic run, which would
otherwise write every allocation twice."""

from __future__ import annotations

import pytest
import torch

from .core_testlib import engine_import

runtime, = engine_import("core", "runtime")


@pytest.fixture
def restore_numerics():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.utils.deterministic.fill_uninitialized_memory = saved[2]


def test_probes_nan_fill_new_tensors_and_a_deterministic_run_does_not(restore_numerics):
    runtime.setup("cpu", deterministic=True, reference_numerics=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory
    assert torch.empty(1024).isnan().all()  # torch's fill: what the gates' probes run with
    runtime.setup("cpu", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.utils.deterministic.fill_uninitialized_memory
