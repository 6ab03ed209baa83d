"""The QKV projection and RoPE, plain: one F.linear per weight, then the reference rotate-half RoPE.

qkv_rope(x (B, S, h), (wq (n*d, h), wk (g*d, h), wv (g*d, h)), cos (S, d), sin (S, d))
    -> q (B, S, n, d) and k (B, S, g, d) rotated, v (B, S, g, d); d is the tables' width.

The registry's default is not this function but `unfused`: the model then calls the selected gemm.qkv and
rope ops one by one. This is the math every fused `qkv_rope` is tested against; it calls the gemm and rope
references themselves, so selecting it gives bitwise the unfused reference path.
"""

from torch import Tensor

from ..gemm.reference import gemm
from ..rope.reference import rope


def head_counts(weights: tuple[Tensor, Tensor, Tensor], d: int) -> tuple[int, int]:
    """(n, g) from the weights' rows; raises ValueError unless they are whole heads of d with wk, wv alike."""
    wq, wk, wv = weights
    if d < 2 or d % 2 or wq.shape[0] % d or wk.shape[0] % d or wk.shape != wv.shape or wq.shape[1] != wk.shape[1]:
        raise ValueError(f"qkv_rope: weights {tuple(wq.shape)}, {tuple(wk.shape)}, {tuple(wv.shape)} are not whole "
                         f"heads of the tables' even width {d}")
    return wq.shape[0] // d, wk.shape[0] // d


def qkv_rope(x: Tensor, weights: tuple[Tensor, Tensor, Tensor], cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, S, d = x.shape[0], x.shape[1], cos.shape[-1]
    n, g = head_counts(weights, d)
    q, k, v = gemm(x, weights)
    q, k = rope(q.view(B, S, n, d), k.view(B, S, g, d), cos, sin)
    return q, k, v.view(B, S, g, d)
