"""SwiGLU, silu(gate) * up, as one Triton pass forward and one backward.

Two entry points with one kernel pair: `swiglu(gate, up)` on separate tensors, and
`swiglu_fused(gate_up)` on the fused fc1 output (..., 2f) whose first half is the gate and second half
the up projection (the layout of one GEMM against the concatenated [gate_proj; up_proj] weight). The
fused form's gradient is one (..., 2f) tensor, which is exactly the fc1 GEMM's output gradient.

Numerics: fp32 math. The forward rounds silu(gate) to the storage dtype before the product, as the
reference (`F.silu(g) * u` in bf16) does, so bf16 outputs match it to the last bit in almost every
element; the backward rounds once.

Layout: the last dimension is contiguous; leading dimensions flatten to rows (views of a fused buffer
keep their row stride, nothing is copied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import space
from .._triton import HAS_TRITON, require_triton, tl, triton  # noqa: F401 - HAS_TRITON: read by the registry


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, o_ptr, f, g_stride, u_stride, o_stride, n_col_blocks, BLOCK: tl.constexpr):
    # One program per (row, column block), flattened on grid axis 0 (axis 1 is capped at 65535).
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = o_ptr.dtype.element_ty
    silu = (g * tl.sigmoid(g)).to(dtype).to(tl.float32)  # rounded where the reference rounds
    tl.store(o_ptr + row * o_stride + cols, (silu * u).to(dtype), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    do_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, f,
    do_stride, g_stride, u_stride, dg_stride, du_stride, n_col_blocks, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    do = tl.load(do_ptr + row * do_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    dg = do * u * sig * (1.0 + g * (1.0 - sig))
    du = do * g * sig
    tl.store(dg_ptr + row * dg_stride + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * du_stride + cols, du.to(du_ptr.dtype.element_ty), mask=mask)


def _require_triton(*tensors: Tensor) -> None:
    require_triton("SwiGLU")
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("SwiGLU kernels need a contiguous last dimension")


def _rows(x: Tensor) -> Tensor:
    """(..., f) -> (rows, f) as a view (a copy only for inputs that cannot be viewed so)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _launch(rows: int, f: int) -> tuple[tuple[int], int, dict]:
    """(grid, column blocks per row, meta): `block` columns per program, from the tuned space."""
    block, warps = space.value("swiglu", "triton_fused", "block"), space.value("swiglu", "triton_fused", "num_warps")
    n_col_blocks = triton.cdiv(f, block)
    return (rows * n_col_blocks,), n_col_blocks, dict(BLOCK=block, num_warps=warps)


def swiglu_fwd(gate: Tensor, up: Tensor, out: Tensor | None = None) -> Tensor:
    """out = silu(gate) * up; `out` (same shape as gate, contiguous rows) is written when given."""
    assert gate.shape == up.shape, (gate.shape, up.shape)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    g2, u2, o2 = _rows(gate), _rows(up), out.view(-1, gate.shape[-1])
    _require_triton(g2, u2, o2)
    rows, f = g2.shape
    if rows == 0:
        return out
    grid, n_col_blocks, meta = _launch(rows, f)
    _swiglu_fwd_kernel[grid](g2, u2, o2, f, g2.stride(0), u2.stride(0), o2.stride(0), n_col_blocks, **meta)
    return out


def swiglu_bwd(
    dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor | None = None, dup: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(d gate, d up) of silu(gate) * up; writes into `dgate` / `dup` when given (views of one
    (..., 2f) buffer work: that is how the fused form returns one gradient)."""
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if dgate is None else dgate
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device) if dup is None else dup
    f = gate.shape[-1]
    do2, g2, u2 = _rows(dout.contiguous() if dout.stride(-1) != 1 else dout), _rows(gate), _rows(up)
    dg2, du2 = dgate.view(-1, f), dup.view(-1, f)  # views (raise rather than write into a copy)
    _require_triton(do2, g2, u2, dg2, du2)
    rows = g2.shape[0]
    if rows == 0:
        return dgate, dup
    grid, n_col_blocks, meta = _launch(rows, f)
    _swiglu_bwd_kernel[grid](
        do2, g2, u2, dg2, du2, f,
        do2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0), n_col_blocks, **meta,
    )  # fmt: skip
    return dgate, dup


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dout: Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dout, gate, up)


class _SwiGLUFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dout: Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        d_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        dgate, dup = d_gate_up.chunk(2, dim=-1)
        swiglu_bwd(dout, gate, up, dgate, dup)
        return d_gate_up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, differentiable; gate and up (..., f)."""
    return _SwiGLU.apply(gate, up)


def swiglu_fused(gate_up: Tensor) -> Tensor:
    """silu(gate) * up from the fused fc1 output (..., 2f) = [gate | up]; returns (..., f)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"the fused SwiGLU input needs an even last dimension, got {gate_up.shape[-1]}")
    return _SwiGLUFused.apply(gate_up)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """The reference math (gates/stacks/torch_ref/model.py MLP)."""
    return F.silu(gate) * up


def swiglu_fused_reference(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
