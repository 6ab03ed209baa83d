"""The SwiGLU MLP, plain: down(silu(x @ gate^T) * (x @ up^T)); x (..., h), gate / up (f, h), down (h, f).

The registry's default is not this function but `unfused`: the model then calls the selected
gemm.fc1 -> swiglu -> gemm.fc2 ops one by one. This is the math every fused `mlp` is tested against.
"""

import torch.nn.functional as F
from torch import Tensor


def mlp(x: Tensor, gate_w: Tensor, up_w: Tensor, down_w: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)
