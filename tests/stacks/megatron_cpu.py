"""Test-only shims that let megatron-core 0.15 run its GPTModel on the CPU (gloo, fp32), so the
megatron stack's own logic (conversion into the live model, MiniCPM hooks, DDP + optimizer path) is
checked against the torch reference here. Megatron's math is untouched: the shims only answer
`torch.cuda.current_device()` with the CPU (and `is_available()` with False, on a GPU machine), skip the CUDA RNG tracker's fork (dropout is 0) and give
the default causal mask a CPU home. The real stack runs on CUDA with none of this."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest

HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None
needs_megatron = pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core is not installed here")


def apply_cpu_shims(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    # On a GPU machine megatron's RNG setup would see CUDA and hand "cpu" to CUDA calls: it sees a CPU box.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(mrandom.CudaRNGStatesTracker, "fork", lambda self, name="model-parallel-rng": contextlib.nullcontext())
