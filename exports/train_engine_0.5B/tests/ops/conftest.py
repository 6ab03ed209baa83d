"""Setup for the Triton op tests (tests/ops/test_*_triton.py).

Without CUDA the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`): numpy on the CPU, float32
cases only (bf16 cases are marked `gpu` and skipped; the interpreter also truncates instead of rounding
to bf16). `triton.jit` reads the variable when it decorates a kernel, so it is set here, before the test
modules of this folder are imported, and only when no CUDA device is present (on a GPU machine the same
tests compile and run the real kernels). A kernel module imported earlier in the session (through the
op registry, by another test) was decorated for a GPU: it is re-imported under the interpreter.
The interpreter needs triton >= 3.9 (older ones cannot loop over a range whose bounds are computed in
the kernel); with an older one these tests are skipped, saying so. On a GPU, triton 3.6 is enough.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

_INTERPRETED = not torch.cuda.is_available()
if _INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for name in [m for m in sys.modules if m.startswith("train_engine_0_5b.ops.") and m.endswith(".triton_fused")]:
        importlib.reload(sys.modules[name])


def _old_interpreter() -> str | None:
    try:
        import triton
    except ImportError:
        return None  # the test modules skip themselves (importorskip)
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        return f"the Triton interpreter of triton {triton.__version__} is too old (needs >= 3.9)"
    return None


def pytest_collection_modifyitems(config, items):
    """Skips this folder's Triton tests (test_*_triton.py) under an interpreter that cannot run them."""
    reason = _old_interpreter() if _INTERPRETED else None
    if reason:
        here = Path(__file__).parent
        for item in items:
            path = Path(item.fspath)
            if path.parent == here and path.name.startswith("test_") and path.name.endswith("_triton.py"):
                item.add_marker(pytest.mark.skip(reason=reason))
