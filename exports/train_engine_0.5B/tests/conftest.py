"""pytest hooks and fixtures for the engine's tests; the helpers and fixtures live in engine_testlib.py.

Without a GPU, Triton kernels run only under Triton's interpreter, and `TRITON_INTERPRET` must be set before
triton is first imported (the op registry imports the Triton modules when the engine is first imported): set
here, before any test module loads. The core's tests (core_train_engine_0_5b/) are collected before ops/,
whose conftest would otherwise set it too late for them (the repository root's conftest.py does the same for
the root `pytest` run)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine_testlib import cli, one_thread  # noqa: E402, F401 - fixtures (importing it also puts src/ on sys.path)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU machines")
    config.addinivalue_line("markers", "slow: multi-process or multi-second tests")
