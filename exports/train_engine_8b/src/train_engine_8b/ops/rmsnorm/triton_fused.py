"""RMSNorm, and the MiniCPM "residual add + RMSNorm", as one Triton pass forward and one backward.

    rms_norm(x, w, eps)                 out = w * rmsnorm(x)
    add_rms_norm(x, y, w, eps, s)       new_x = x + s * y;  out = w * rmsnorm(new_x);  returns (out, new_x)

`add_rms_norm` is the seam between sublayers: x is the residual stream, y the attention or MLP output,
s = scale_depth / sqrt(L) the residual scale. Fusing it reads x and y once and writes new_x and out
once, instead of three elementwise passes plus the norm.

Numerics: statistics in fp32; rstd (fp32, one per row) is saved for the backward. The forward rounds
where the reference rounds (gates/stacks/torch_ref/model.py): s * y and x + s * y each to the stream's
dtype, and the normalized row to the input dtype before the weight (HF Llama's `w * y.to(dtype)`),
so bf16 outputs match the reference almost everywhere bit for bit. The backward is fp32 and rounds
once; the weight gradient is summed in fp32 per program, then over programs (deterministic).

Layout: rows of h contiguous elements (leading dims flatten); the output dtype is x's; h must fit
one block (h <= 65536).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import space
from .._triton import HAS_TRITON, require_triton, tl, triton  # noqa: F401 - HAS_TRITON: read by the registry


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr, y_ptr, w_ptr, out_ptr, newx_ptr, rstd_ptr, h,
    x_stride, y_stride, out_stride, newx_stride, eps, scale,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < h
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(y_ptr + row * y_stride + cols, mask=mask, other=0.0).to(tl.float32)
        sy = (y * scale).to(dtype).to(tl.float32)  # the reference's `sublayer(x) * s`, rounded
        x = (x + sy).to(dtype).to(tl.float32)  # the residual stream is stored in its dtype
        tl.store(newx_ptr + row * newx_stride + cols, x.to(dtype), mask=mask)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / h + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = (x * rstd).to(dtype).to(tl.float32)  # `w * y.to(x.dtype)`: normalized row rounded first
    tl.store(out_ptr + row * out_stride + cols, (xhat * w).to(dtype), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    dout_ptr, dnewx_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dy_ptr, dw_partial_ptr, n_rows, h, rows_per_program,
    dout_stride, dnewx_stride, x_stride, dx_stride, dy_stride, scale,
    HAS_RESIDUAL: tl.constexpr, HAS_DNEWX: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # A persistent program walks a contiguous range of rows and keeps its share of dw in registers, so
    # dw costs one (programs, h) fp32 write instead of a (rows, h) one.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < h
    dtype = x_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 bounds make the row index int64 too
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + row * dout_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        dw += dout * xhat.to(dtype).to(tl.float32)  # the weight multiplied the rounded row
        dxhat = dout * w
        # d/dx of x * rstd(x): rstd * (dxhat - xhat * mean(dxhat * xhat))
        dx = (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / h)) * rstd
        if HAS_DNEWX:  # new_x is also read by the residual path: its gradient adds here
            dx += tl.load(dnewx_ptr + row * dnewx_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            tl.store(dy_ptr + row * dy_stride + cols, (dx * scale).to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * h + cols, dw, mask=mask)


def _require_triton(*tensors: Tensor) -> None:
    require_triton("RMSNorm")
    if any(t is not None and t.stride(-1) != 1 for t in tensors):
        raise ValueError("RMSNorm kernels need a contiguous last dimension")


def _rows(x: Tensor) -> Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _launch_config(h: int, op: str) -> tuple[int, int]:
    """(block, warps) for rows of h; `op` (rms_norm / add_rms_norm) names whose tuned num_warps applies."""
    block = triton.next_power_of_2(h)
    if block > 65536:
        raise ValueError(f"RMSNorm rows of {h} elements do not fit one block")
    warps = space.value(op, "triton_fused", "num_warps")
    return block, warps if warps is not None else min(16, max(1, block // 256))  # 8 bf16 per thread at h = 1024


_PROGRAMS_PER_SM = 8  # backward: enough row loops in flight per SM to hide their load latency


def _num_programs(device: torch.device, rows: int) -> int:
    if device.type == "cuda":
        return min(rows, _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)  # the interpreter: a few programs still exercise the row split


def rms_norm_fwd(
    x: Tensor, weight: Tensor, eps: float, y: Tensor | None = None, residual_scale: float = 1.0,
    out: Tensor | None = None, new_x: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:  # fmt: skip
    """Returns (out, new_x, rstd): out = w * rmsnorm(x [+ s * y]); new_x = x + s * y (None without y);
    rstd (rows,) fp32. `out` / `new_x` are written when given."""
    h = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if y is not None:
        assert y.shape == x.shape, (x.shape, y.shape)
        new_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if new_x is None else new_x
    x2, o2 = _rows(x), out.view(-1, h)
    y2 = _rows(y) if y is not None else None
    n2 = new_x.view(-1, h) if y is not None else None
    _require_triton(x2, y2, o2, n2, weight)
    rows = x2.shape[0]
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, new_x, rstd
    block, num_warps = _launch_config(h, "add_rms_norm" if y is not None else "rms_norm")
    _rmsnorm_fwd_kernel[(rows,)](
        x2, y2 if y2 is not None else x2, weight, o2, n2 if n2 is not None else o2, rstd, h,
        x2.stride(0), y2.stride(0) if y2 is not None else 0, o2.stride(0), n2.stride(0) if n2 is not None else 0,
        eps, residual_scale, HAS_RESIDUAL=y is not None, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return out, new_x, rstd


def rms_norm_bwd(
    dout: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dnew_x: Tensor | None = None,
    residual_scale: float | None = None, dx: Tensor | None = None, dy: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:  # fmt: skip
    """Returns (dx, dy, dweight). `x` is the normalized input (new_x for the fused form); `dnew_x`, the
    gradient reaching new_x through the residual path, adds to dx; with `residual_scale` given (the
    fused form) dy = s * dx is also written. `dx` / `dy` are written when given."""
    h = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if dx is None else dx
    has_residual = residual_scale is not None
    if has_residual:
        dy = torch.empty(x.shape, dtype=x.dtype, device=x.device) if dy is None else dy
    do2, x2, dx2 = _rows(dout.contiguous()), _rows(x), dx.view(-1, h)
    dn2 = _rows(dnew_x.contiguous()) if dnew_x is not None else None
    dy2 = dy.view(-1, h) if has_residual else None
    _require_triton(do2, x2, dx2, dn2, dy2, weight)
    rows = x2.shape[0]
    programs = _num_programs(x.device, rows)
    dw_partial = torch.empty(max(programs, 1), h, dtype=torch.float32, device=x.device)
    if rows == 0:
        return dx, dy, torch.zeros_like(weight)
    block, num_warps = _launch_config(h, "add_rms_norm" if has_residual else "rms_norm")
    _rmsnorm_bwd_kernel[(programs,)](
        do2, dn2 if dn2 is not None else do2, x2, weight, rstd, dx2, dy2 if dy2 is not None else dx2,
        dw_partial, rows, h, triton.cdiv(rows, programs),
        do2.stride(0), dn2.stride(0) if dn2 is not None else 0, x2.stride(0), dx2.stride(0),
        dy2.stride(0) if dy2 is not None else 0, residual_scale if has_residual else 1.0,
        HAS_RESIDUAL=has_residual, HAS_DNEWX=dnew_x is not None, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return dx, dy, dw_partial.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        out, _, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, _, dw = rms_norm_bwd(dout, x, weight, rstd)
        return dx, dw, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, weight: Tensor, eps: float, residual_scale: float):
        out, new_x, rstd = rms_norm_fwd(x, weight, eps, y=y, residual_scale=residual_scale)
        ctx.save_for_backward(new_x, weight, rstd)
        ctx.residual_scale = residual_scale
        return out, new_x

    @staticmethod
    def backward(ctx, dout: Tensor, dnew_x: Tensor | None):
        new_x, weight, rstd = ctx.saved_tensors
        dx, dy, dw = rms_norm_bwd(dout, new_x, weight, rstd, dnew_x=dnew_x, residual_scale=ctx.residual_scale)
        return dx, dy, dw, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * rmsnorm(x), differentiable in x and weight."""
    return _RMSNorm.apply(x, weight, eps)


def add_rms_norm(x: Tensor, y: Tensor, weight: Tensor, eps: float, residual_scale: float) -> tuple[Tensor, Tensor]:
    """(weight * rmsnorm(x + s * y), x + s * y), differentiable in x, y and weight."""
    return _AddRMSNorm.apply(x, y, weight, eps, residual_scale)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The reference math (gates/stacks/torch_ref/model.py RMSNorm)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm_reference(
    x: Tensor, y: Tensor, weight: Tensor, eps: float, residual_scale: float
) -> tuple[Tensor, Tensor]:
    new_x = x + y * residual_scale
    return rms_norm_reference(new_x, weight, eps), new_x
