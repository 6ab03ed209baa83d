"""residual_scale, weight: r multiplies the out-projection weights (o_proj, down_proj) instead of
their outputs; the model then calls add_rms_norm with residual scale 1.

    y * r = (x @ W^T) * r = x @ (r W)^T

Autograd of `r * W` puts the scaling on weight-sized tensors: dX = dh @ (r W) needs no pass over dh, and
dW = r * (dh^T x) is one pass over the (small) weight gradient. At MiniCPM4-0.5B, seq 4096, micro batch 8
a layer's two out-projection weights hold 5.2 M elements against 2 x 33.6 M in the two outputs.
Same math; the rounding differs (r W is rounded to the compute dtype before the GEMM), so this is held to
the reference within rounding, not bitwise.

residual_scale(w, r) -> w * r
"""

from torch import Tensor


def residual_scale(w: Tensor, r: float) -> Tensor:
    return w * r
