"""The QKV projection as one GEMM on the concatenated weights, then one Triton pass that rotates q and k
(rotate-half RoPE) and copies v out of the packed (B, S, (n + 2g) * d) result; its backward is the same
pass by -theta, writing the packed gradient that the one dgrad / wgrad GEMM pair takes.

Why: three GEMMs per layer (q, then k and v at N = 128) and a three-way sum of their input gradients cost
more than one N = 1280 GEMM, and Inductor's own RoPE backward over a concatenation was slow (measurements:
benchmarks/results/engine-0.5b-qkv-rope-*). Here the concatenation is this kernel's own store: each program
handles one token, every load and store is a contiguous run of the row.

    forward   qkv = x @ cat(wq, wk, wv)^T              torch (cuBLAS); the weights' gradients split back
              q, k, v = rotate(qkv)                     custom op <package>::qkv_rope_fwd
    backward  dqkv = rotate^-1(dq, dk, dv)              custom op <package>::qkv_rope_bwd
              dx = dqkv @ cat(w); dw = dqkv^T @ x        torch (cuBLAS)

Both passes are `torch.library` custom ops with fakes and an autograd formula, so torch.compile keeps each
as one node. Outputs are new contiguous tensors (q (B, S, n, d), k / v (B, S, g, d)), as the attention
kernels take them. Tables (>= S, d) as model.rope_cos_sin builds them (per-frequency LongRoPE factors and the
cos/sin scale in them), halves equal; only the first half is read; positions are 0..S-1 in every sequence. fp32 math, one rounding at the store.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import LIBRARY, space
from .._triton import HAS_TRITON, require_triton, tl, triton  # noqa: F401 - HAS_TRITON: read by the registry
from .reference import head_counts


@triton.jit
def _rotate(src, dst, n_heads, half, cos, sin, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotates n_heads contiguous heads of width 2 * half from src to dst (both at the token's first head)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (cols < half)
    off = heads * (2 * half) + cols
    x1 = tl.load(src + off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + off + half, mask=mask, other=0.0).to(tl.float32)
    dtype = dst.dtype.element_ty
    tl.store(dst + off, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(dst + off + half, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _copy(src, dst, width, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    tl.store(dst + cols, tl.load(src + cols, mask=mask, other=0.0).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_rope_kernel(
    packed_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, S, n_q, n_kv, half, cos_ss, sin_ss,
    BACKWARD: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)  # token b * S + s
    s = t % S
    d = 2 * half
    packed = packed_ptr + t * ((n_q + 2 * n_kv) * d)
    q, k, v = q_ptr + t * (n_q * d), k_ptr + t * (n_kv * d), v_ptr + t * (n_kv * d)
    cols = tl.arange(0, BLOCK_D)
    cos = tl.load(cos_ptr + s * cos_ss + cols, mask=cols < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + s * sin_ss + cols, mask=cols < half, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:  # the transpose of a rotation is the rotation by -theta: split gradients -> packed row
        _rotate(q, packed, n_q, half, cos, -sin, BLOCK_QH, BLOCK_D)
        _rotate(k, packed + n_q * d, n_kv, half, cos, -sin, BLOCK_KH, BLOCK_D)
        _copy(v, packed + (n_q + n_kv) * d, n_kv * d, BLOCK_V)
    else:  # packed row -> rotated q, rotated k, v
        _rotate(packed, q, n_q, half, cos, sin, BLOCK_QH, BLOCK_D)
        _rotate(packed + n_q * d, k, n_kv, half, cos, sin, BLOCK_KH, BLOCK_D)
        _copy(packed + (n_q + n_kv) * d, v, n_kv * d, BLOCK_V)


def _launch(packed: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> None:
    B, S, n, d = q.shape
    g = k.shape[2]
    if d % 2 or cos.shape[-1] != d or sin.shape[-1] != d or cos.shape[0] < S or sin.shape[0] < S:
        raise ValueError(f"qkv_rope: tables (>= S, d) = (>= {S}, {d}) with even d, got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("qkv_rope: the tables need a contiguous last dimension")
    if B * S == 0:
        return
    _qkv_rope_kernel[(B * S,)](
        packed, q, k, v, cos, sin, S, n, g, d // 2, cos.stride(0), sin.stride(0), BACKWARD=backward,
        BLOCK_QH=triton.next_power_of_2(n), BLOCK_KH=triton.next_power_of_2(g), BLOCK_D=triton.next_power_of_2(d // 2),
        BLOCK_V=triton.next_power_of_2(g * d),
        num_warps=space.value("qkv_rope", "triton_fused", "num_warps") or (4 if (n + 2 * g) * d >= 2048 else 2),
    )  # fmt: skip


def rotate_packed(qkv: Tensor, cos: Tensor, sin: Tensor, n: int, g: int,
                  out: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The forward pass: packed qkv (B, S, (n + 2g) * d) -> (rope(q) (B, S, n, d), rope(k), v (B, S, g, d)),
    into `out` (contiguous, those shapes) when given, else new tensors."""
    require_triton("QKV RoPE")
    B, S, width = qkv.shape
    d = cos.shape[-1]
    if width != (n + 2 * g) * d:
        raise ValueError(f"qkv_rope: packed width {width} is not (n + 2g) * d = ({n} + 2 * {g}) * {d}")
    qkv = qkv.contiguous()
    q, k, v = out if out is not None else (qkv.new_empty(B, S, n, d), qkv.new_empty(B, S, g, d), qkv.new_empty(B, S, g, d))
    assert all(t.is_contiguous() for t in (q, k, v)), "qkv_rope: outputs must be contiguous"
    _launch(qkv, q, k, v, cos, sin, backward=False)
    return q, k, v


def unrotate_to_packed(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None = None) -> Tensor:
    """The backward pass: gradients of (q, k, v) -> the packed gradient (B, S, (n + 2g) * d) of qkv."""
    require_triton("QKV RoPE")
    B, S, n, d = dq.shape
    g = dk.shape[2]
    if dk.shape != (B, S, g, d) or dv.shape != dk.shape:
        raise ValueError(f"qkv_rope: gradients {tuple(dq.shape)}, {tuple(dk.shape)}, {tuple(dv.shape)} do not match")
    out = dq.new_empty(B, S, (n + 2 * g) * d) if out is None else out
    assert out.is_contiguous() and out.shape == (B, S, (n + 2 * g) * d), "qkv_rope: bad packed gradient buffer"
    _launch(out, dq.contiguous(), dk.contiguous(), dv.contiguous(), cos, sin, backward=True)
    return out


@torch.library.custom_op(f"{LIBRARY}::qkv_rope_fwd", mutates_args=())
def qkv_rope_fwd(qkv: Tensor, cos: Tensor, sin: Tensor, n: int, g: int) -> tuple[Tensor, Tensor, Tensor]:
    return rotate_packed(qkv, cos, sin, n, g)


@qkv_rope_fwd.register_fake
def _(qkv: Tensor, cos: Tensor, sin: Tensor, n: int, g: int) -> tuple[Tensor, Tensor, Tensor]:
    B, S, d = qkv.shape[0], qkv.shape[1], cos.shape[-1]
    return qkv.new_empty(B, S, n, d), qkv.new_empty(B, S, g, d), qkv.new_empty(B, S, g, d)


@torch.library.custom_op(f"{LIBRARY}::qkv_rope_bwd", mutates_args=())
def qkv_rope_bwd(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return unrotate_to_packed(dq, dk, dv, cos, sin)


@qkv_rope_bwd.register_fake
def _(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    B, S, n, d = dq.shape
    return dq.new_empty(B, S, (n + 2 * dk.shape[2]) * d)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    qkv, cos, sin, n, g = inputs
    ctx.save_for_backward(cos, sin)
    ctx.shapes = ((*qkv.shape[:2], n, cos.shape[-1]), (*qkv.shape[:2], g, cos.shape[-1]))


def _backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None):
    cos, sin = ctx.saved_tensors
    like = next(t for t in (dq, dk, dv) if t is not None)  # at least one output reached the loss
    q_shape, kv_shape = ctx.shapes
    dq = like.new_zeros(q_shape) if dq is None else dq
    dk = like.new_zeros(kv_shape) if dk is None else dk
    dv = like.new_zeros(kv_shape) if dv is None else dv
    return qkv_rope_bwd(dq, dk, dv, cos, sin), None, None, None, None


qkv_rope_fwd.register_autograd(_backward, setup_context=_setup_context)


def qkv_rope(x: Tensor, weights: tuple[Tensor, Tensor, Tensor], cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The registry op (reference.py's signature): x (B, S, h) -> rope(q) (B, S, n, d), rope(k), v (B, S, g, d)."""
    n, g = head_counts(weights, cos.shape[-1])
    qkv = F.linear(x, torch.cat(weights))  # (B, S, (n + 2g) * d): one GEMM; autograd splits the weight gradient
    return qkv_rope_fwd(qkv, cos, sin, n, g)
