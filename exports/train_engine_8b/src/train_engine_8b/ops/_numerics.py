"""Dtype rules the reference ops share (HF Llama's): statistics, softmax and the loss run in >= float32."""

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
