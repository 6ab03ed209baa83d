"""Setup for the Triton op tests (tests/ops/test_*_triton.py).

Without CUDA the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`): numpy on the CPU, float32
cases only (bf16 cases are marked `gpu` and skipped; the interpreter also truncates instead of rounding
to bf16). `triton.jit` reads the variable when it decorates a kernel, so it is set here, before the test
modules of this folder are imported, and only when no CUDA device is present (on a GPU machine the same
tests compile and run the real kernels). A kernel module imported earlier in the session (through the
op registry, by another test) was decorated for a GPU: it is re-imported under the interpreter.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for name in [m for m in sys.modules if m.startswith("train_engine_0_5b.ops.") and m.endswith(".triton_fused")]:
        importlib.reload(sys.modules[name])
