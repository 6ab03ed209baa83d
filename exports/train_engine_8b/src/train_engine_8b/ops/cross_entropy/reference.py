"""Token cross-entropy, plain: the SUM over labels != -100, in >= float32.

cross_entropy(logits (B, S, V), labels (B, S) int64) -> 0-dim sum. The caller divides by the global
count of valid labels (all ranks, all micro batches), so data parallelism never averages means.
linear_cross_entropy(x (B, S, h), weight (V, h), labels) -> the same sum for logits = x @ weight^T: the
output GEMM and the loss as one op, for fusions that never hold the whole logits (triton_fused.py).
"""

import torch.nn.functional as F
from torch import Tensor

from .._numerics import upcast

IGNORE_INDEX = -100


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(upcast(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy(x: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    return cross_entropy(F.linear(x, weight), labels)
