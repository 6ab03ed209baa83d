"""Token cross-entropy, plain: the SUM over labels != -100, in >= float32.

cross_entropy(logits (B, S, V), labels (B, S) int64) -> 0-dim sum. The caller divides by the global
count of valid labels (all ranks, all micro batches), so data parallelism never averages means.
"""

import torch.nn.functional as F
from torch import Tensor

from train_engine_0_5b.ops._numerics import upcast

IGNORE_INDEX = -100


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(upcast(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
