"""Triton for the `triton_fused` op modules, importable without Triton installed.

Without it, `triton.jit` is a no-op decorator and `HAS_TRITON` is False: the modules still import (the
registry then lists them as unavailable) and launching a kernel raises through `require_triton`.
"""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    from types import SimpleNamespace

    triton, tl = SimpleNamespace(jit=lambda fn: fn), SimpleNamespace(constexpr=None)
    HAS_TRITON = False


def require_triton(op: str) -> None:
    """Raises when Triton is missing, naming the op (`op` as in "the Triton {op}")."""
    if not HAS_TRITON:
        raise RuntimeError(f"the Triton {op} needs `triton` (pip install triton); the reference runs without it")
