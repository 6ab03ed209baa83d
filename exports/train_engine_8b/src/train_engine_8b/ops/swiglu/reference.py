"""SwiGLU, plain: silu(gate) * up; gate and up (..., f)."""

import torch.nn.functional as F
from torch import Tensor


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up
