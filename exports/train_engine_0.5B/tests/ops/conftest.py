"""Setup for the Triton op tests (tests/ops/test_*_triton.py).

Without CUDA the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`): numpy on the CPU, float32
cases only (bf16 cases are marked `gpu` and skipped). The variable must be set before the kernel modules
are imported, because `triton.jit` reads it when it decorates a kernel; pytest imports this conftest
before the test modules of this folder, so it is set here, and only when no CUDA device is present (on
a GPU machine the same tests compile and run the real kernels).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_SRC = Path(__file__).resolve().parents[2] / "src"
if str(_SRC) not in sys.path:  # the engine's package, when it is not pip-installed
    sys.path.insert(0, str(_SRC))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU machines")
