"""linear_cross_entropy as triton_fused.py's op, with each chunk's logits and dx GEMMs on quack (`quack-kernels`,
sm90+) instead of cuBLAS; the Triton loss / gradient pass and the cuBLAS dW GEMM are triton_fused.py's.

Why: quack's GEMMs with SM90 tile configs beat cuBLAS at the output's shapes (measurements: benchmarks/results).
With gradients and `lse_epilogue` (declared in the op table), the logits GEMM's epilogue also gives each row's
logsumexp per N-tile (one small Triton kernel folds them and takes the loss), so the Triton gradient pass reads the
logits once instead of twice (its launch: one_pass_launch, tunable); the row sums it also takes renormalize the
loss and gradients to the rounded logits (triton_fused._renormalize). bf16 / fp16 CUDA tensors on compute
capability 9.0+.
"""

from __future__ import annotations

from torch import Tensor

from .. import _quack, space
from ...core.errors import EngineError
from .._hopper import require_hopper_half
from ..table import quack_widths
from .triton_fused import HAS_TRITON, LINEAR_CE_CHUNK, _linear_ce_sum  # noqa: F401 - HAS_TRITON: read by the registry

UNAVAILABLE_REASON = _quack.UNAVAILABLE_REASON


def linear_cross_entropy(x: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """The registry op (reference.py's signature): sum of CE(x @ weight^T, labels) over labels != -100."""
    require_hopper_half(x, "linear_cross_entropy=quack_triton", "triton_fused")
    if why := quack_widths(x.shape[-1], weight.shape[0]):  # quack's own error names no width
        raise EngineError(f"ops.linear_cross_entropy=quack_triton needs {why}; use triton_fused")
    lse = space.value("linear_cross_entropy", "quack_triton", "lse_epilogue")
    return _linear_ce_sum(x, weight, labels, 1.0, LINEAR_CE_CHUNK, gemms="quack_lse" if lse else "quack")
