"""linear_cross_entropy as triton_fused.py's op, with each chunk's logits GEMM on quack (`quack-kernels`, sm90+)
instead of cuBLAS; the Triton loss / gradient pass and the cuBLAS dx / dW GEMMs are triton_fused.py's.

Why: that GEMM (8192 tokens x 73448 x 1024 per chunk) is the one output-layer GEMM cuBLAS runs well below its
~700 TFLOP/s elsewhere: 2.02 ms (610 TFLOP/s) on an H100, against 1.64 ms (751) for quack with the SM90 tile
config pinned in ops/_quack.py. bf16 / fp16 CUDA tensors on compute capability 9.0+.
"""

from __future__ import annotations

from torch import Tensor

from train_engine_0_5b.ops import _quack
from train_engine_0_5b.ops._hopper import require_hopper_half
from train_engine_0_5b.ops.cross_entropy.triton_fused import HAS_TRITON, LINEAR_CE_CHUNK, _linear_ce_sum  # noqa: F401 - HAS_TRITON: read by the registry

UNAVAILABLE_REASON = _quack.UNAVAILABLE_REASON


def linear_cross_entropy(x: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """The registry op (reference.py's signature): sum of CE(x @ weight^T, labels) over labels != -100."""
    require_hopper_half(x, "linear_cross_entropy=quack_triton", "triton_fused")
    return _linear_ce_sum(x, weight, labels, 1.0, LINEAR_CE_CHUNK, logits_gemm="quack")
