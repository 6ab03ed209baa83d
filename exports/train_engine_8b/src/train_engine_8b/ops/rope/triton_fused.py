"""Rotate-half RoPE on q and k in one Triton launch, forward and backward.

    out[..., :d/2] = x1 * cos - x2 * sin        out[..., d/2:] = x2 * cos + x1 * sin

as the reference's `x * cos + cat(-x2, x1) * sin` (HF Llama / MiniCPM / Megatron layout). The backward
is the same rotation by -theta (the rotation is orthogonal), so one kernel serves both directions.

Layout: q (B, S, n, d) and k (B, S, g, d), any strides except a contiguous last dimension: views into a
fused qkv projection output work as they are, and a (B, heads, S, d) tensor is passed as
`x.transpose(1, 2)`. One program per token (b, s) loads its cos/sin row once and rotates all n + g
heads. Tables are (S_max, d) as `rope_tables` (reference.py) builds them, halves equal, any per-frequency
factors (LongRoPE) and cos/sin scale already in them; only the first half is read. Positions are 0..S-1 in
every sequence. A table scaled by m is m times a rotation, whose transpose is m times the rotation by -theta:
the backward is the same kernel with sin negated in every case.

Numerics: fp32 math on the tables as given (fp32 tables from fp64 angles by default), one rounding to
the output dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import space
from .._triton import HAS_TRITON, require_triton, tl, triton  # noqa: F401 - HAS_TRITON: read by the registry


@triton.jit
def _rotate_heads(x_ptr, o_ptr, b, s, n_heads, half, x_sb, x_ss, x_sh, o_sb, o_ss, o_sh, cos, sin,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (cols < half)
    x = x_ptr + b * x_sb + s * x_ss + heads * x_sh + cols
    o = o_ptr + b * o_sb + s * o_ss + heads * o_sh + cols
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + half, mask=mask, other=0.0).to(tl.float32)
    dtype = o_ptr.dtype.element_ty
    tl.store(o, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(o + half, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, S, n_q, n_k, half,
    q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, qo_sb, qo_ss, qo_sh, ko_sb, ko_ss, ko_sh, cos_ss, sin_ss,
    BACKWARD: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < half
    cos = tl.load(cos_ptr + s * cos_ss + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + s * sin_ss + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:  # the transpose of a rotation is the rotation by -theta
        sin = -sin
    _rotate_heads(q_ptr, qo_ptr, b, s, n_q, half, q_sb, q_ss, q_sh, qo_sb, qo_ss, qo_sh, cos, sin, BLOCK_QH, BLOCK_D)
    _rotate_heads(k_ptr, ko_ptr, b, s, n_k, half, k_sb, k_ss, k_sh, ko_sb, ko_ss, ko_sh, cos, sin, BLOCK_KH, BLOCK_D)


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    require_triton("RoPE")
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"RoPE takes q (B, S, n, d) and k (B, S, g, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    d = q.shape[-1]
    if d % 2 or cos.shape[-1] != d or sin.shape[-1] != d or cos.shape[0] < q.shape[1] or sin.shape[0] < q.shape[1]:
        raise ValueError(f"RoPE tables (>= S, d) = (>= {q.shape[1]}, {d}) with even d, got {tuple(cos.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("RoPE kernels need a contiguous last dimension")


def rope_rotate(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, backward: bool = False,
    q_out: Tensor | None = None, k_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Rotates q (B, S, n, d) and k (B, S, g, d) by +theta (or -theta with `backward`, which maps output
    gradients to input gradients). Writes into `q_out` / `k_out` (same shapes, any strides) when given,
    else into new contiguous tensors."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    _check(q, k, cos, sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.stride(-1) == 1 and k_out.stride(-1) == 1
    B, S, n, d = q.shape
    g = k.shape[2]
    if B * S == 0:
        return q_out, k_out
    block_d = triton.next_power_of_2(d // 2)
    _rope_kernel[(B * S,)](
        q, k, q_out, k_out, cos, sin, S, n, g, d // 2,
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3], cos.stride(0), sin.stride(0),
        BACKWARD=backward, BLOCK_QH=triton.next_power_of_2(n), BLOCK_KH=triton.next_power_of_2(g),
        BLOCK_D=block_d, num_warps=space.value("rope", "triton_fused", "num_warps") or (4 if (n + g) * d >= 2048 else 2),
    )  # fmt: skip
    return q_out, k_out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
        ctx.save_for_backward(cos, sin)
        ctx.shapes = (q.shape, k.shape)
        return rope_rotate(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None):
        cos, sin = ctx.saved_tensors
        like = dq if dq is not None else dk  # at least one output reached the loss
        dq = like.new_zeros(ctx.shapes[0]) if dq is None else dq
        dk = like.new_zeros(ctx.shapes[1]) if dk is None else dk
        dq_in, dk_in = rope_rotate(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(rope(q), rope(k)) for q (B, S, n, d), k (B, S, g, d); differentiable in q and k (the registry op)."""
    return _RoPE.apply(q, k, cos, sin)


def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The reference's rotate-half math (gates/stacks/torch_ref/model.py apply_rope) in the (B, S, heads, d)
    layout; computed in the promoted dtype of x and the tables, returned in x's dtype."""

    def rotate(x: Tensor) -> Tensor:
        S = x.shape[1]
        c, s = cos[:S, None, :], sin[:S, None, :]  # (S, 1, d): broadcast over batch and heads
        x1, x2 = x.chunk(2, dim=-1)
        return (x * c + torch.cat([-x2, x1], dim=-1) * s).to(x.dtype)

    return rotate(q), rotate(k)
