"""Token cross-entropy in Triton, alone and fused with the output projection (chunked over tokens).

Three public ops share the row kernels:

- `cross_entropy(logits, labels)`: the registry op (same signature as reference.py): the summed
  loss over labels != -100, in fp32, without the reference's fp32 copy of the logits. Forward: one read
  of the logits (online logsumexp + the label's logit); backward: one read and one write (the gradient
  of the logits, from the saved logsumexp).
- `fused_linear_cross_entropy(hidden, weight, labels, logit_scale)`: logits = hidden @ weight^T /
  logit_scale, then the summed loss and the valid-token count, never holding more than `chunk_size`
  rows of logits. Per chunk: the logits GEMM (cuBLAS) writes a (chunk, V) buffer; one kernel computes
  each row's loss and overwrites the row with its gradient in place (two reads, one write); two more
  GEMMs give d_hidden = dlogits @ W and d_weight += dlogits^T @ hidden (fp32 accumulation). The
  gradients are therefore computed during the forward (which is why the backward only scales them by
  the incoming gradient of the loss): the full (T, V) logits, 4.8 GB in bf16 at 32k tokens x 73448,
  never exist, and neither does any fp32 copy of them.
- `linear_cross_entropy(x, weight, labels)`: the registry op of that name (reference.py's signature):
  the fusion above as a custom-op pair that torch.compile keeps whole, `LINEAR_CE_CHUNK` tokens per
  chunk. Against the unfused output GEMM + CE it holds a chunk of the logits at a time and never allocates a
  separate logit gradient (measurements: benchmarks/results).

Numerics: logits are rounded to the input dtype by the GEMM, as the reference's bf16 GEMM does; the
softmax, the loss and the logit gradient are fp32, the gradient stored in the logits' dtype (as the
reference's autograd does). 1 / logit_scale multiplies the logits in fp32; for MiniCPM4 (hidden /
dim_model_base = 4, a power of two) this equals the reference's rounding of hidden / 4. The loss is the
sum of per-row fp32 losses (deterministic). Labels must be -100 or in [0, V) (not checked: that would
cost a host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import EngineError
from .. import LIBRARY, _quack, space
from .._triton import HAS_TRITON, require_triton, tl, triton  # noqa: F401 - HAS_TRITON: read by the registry

IGNORE_INDEX = -100


@triton.jit
def _row_lse(row_ptr, V, scale, BLOCK_V: tl.constexpr, EVICT: tl.constexpr):
    """log(sum(exp(scale * row))) in fp32, online over blocks: one read of the row (its loads carry the L2
    eviction hint EVICT, "" for none)."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), -float("inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        z = tl.load(row_ptr + start + cols, mask=start + cols < V, other=-float("inf"), eviction_policy=EVICT)
        z = z.to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _block_grad(row_ptr, grad_ptr, start, V, label, lse, scale, mult, BLOCK_V: tl.constexpr, EVICT: tl.constexpr):
    """grad[start:start + BLOCK_V] = mult * (softmax(scale * row) - onehot(label)) over that block of the row,
    stored in grad_ptr's dtype (may be row_ptr: the block is read before it is overwritten). Returns the block's
    sum of exp(scale * row - lse): 1 over the whole row when lse is the row's own logsumexp."""
    cols = start + tl.arange(0, BLOCK_V)
    mask = cols < V
    z = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32) * scale
    p = tl.exp(z - lse)
    g = p - tl.where(cols == label, 1.0, 0.0)
    tl.store(grad_ptr + cols, (g * mult).to(grad_ptr.dtype.element_ty), mask=mask, eviction_policy=EVICT)
    return tl.sum(tl.where(mask, p, 0.0), axis=0)


@triton.jit
def _row_grad(row_ptr, grad_ptr, V, label, lse, scale, mult, BLOCK_V: tl.constexpr, EVICT: tl.constexpr):
    """_block_grad over the whole row, block by block (the row belongs to this program alone); returns the sum."""
    total = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        total += _block_grad(row_ptr, grad_ptr, start, V, label, lse, scale, mult, BLOCK_V, EVICT)
    return total


@triton.jit
def _ce_fwd_kernel(
    logits_ptr, labels_ptr, loss_ptr, lse_ptr, grad_scale_ptr, n_rows, V_units, stride_units, scale, ignore_index,
    WRITE_GRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, UNIT: tl.constexpr, BLOCK_V: tl.constexpr,
    L2_HINT: tl.constexpr,
):  # fmt: skip
    # Each program takes rows pid, pid + programs, ... (one row each when the grid covers the rows). With
    # WRITE_GRAD the row is overwritten by d(loss)/d(logits); a grid of a few programs per SM keeps the rows
    # in flight few enough (~150 KB each at V 73448) that part of the gradient pass's re-read comes from L2.
    # V and the row stride arrive in UNITs of 8 when the host found them so: 73448 is not a multiple of
    # 16, so Triton would not assume the 16-byte alignment that makes the loads vectorize.
    V = V_units * UNIT
    stride = stride_units * UNIT
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        row_ptr = logits_ptr + row * stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        # L2_HINT: the first read asks L2 to keep the row (for the second); the second read and the store
        # ask it to drop them first
        lse = _row_lse(row_ptr, V, scale, BLOCK_V, "evict_last" if L2_HINT else "")
        z_label = tl.load(row_ptr + tl.where(valid, label, 0)).to(tl.float32) * scale
        tl.store(loss_ptr + row, tl.where(valid, lse - z_label, 0.0))
        tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            # d loss / d logit = scale * (softmax - onehot); ignored rows get zeros (they still enter the GEMMs)
            mult = tl.where(valid, scale, 0.0)
            if HAS_GRAD_SCALE:
                mult = mult * tl.load(grad_scale_ptr)
            _row_grad(row_ptr, row_ptr, V, label, lse, scale, mult, BLOCK_V, "evict_first" if L2_HINT else "")


@triton.jit
def _ce_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, dloss_ptr, grad_ptr, sums_ptr, V_units, stride_units, grad_stride_units,
    n_blocks, scale, ignore_index, SPLIT: tl.constexpr, UNIT: tl.constexpr, BLOCK_V: tl.constexpr,
    SUMS: tl.constexpr,
):  # fmt: skip
    # A program per row, looping over its blocks; or with SPLIT, program pid takes block pid % n_blocks of row
    # pid // n_blocks, so no program loops and the blocks of a row are read and written side by side. With
    # SUMS, program pid stores its part of the row's sum of exp(logit - lse) at sums[pid]: (rows, n_blocks)
    # partials, summed by the host (no atomics: the same bits every run).
    V = V_units * UNIT
    stride = stride_units * UNIT
    grad_stride = grad_stride_units * UNIT
    pid = tl.program_id(0)
    row = (pid // n_blocks).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    mult = tl.where(label != ignore_index, scale, 0.0) * tl.load(dloss_ptr)
    lse = tl.load(lse_ptr + row)
    row_ptr, grad_row_ptr = logits_ptr + row * stride, grad_ptr + row * grad_stride
    if SPLIT:
        part = _block_grad(row_ptr, grad_row_ptr, (pid % n_blocks) * BLOCK_V, V, label, lse, scale, mult, BLOCK_V, "")
    else:
        part = _row_grad(row_ptr, grad_row_ptr, V, label, lse, scale, mult, BLOCK_V, "")
    if SUMS:
        tl.store(sums_ptr + pid, part)


@triton.jit
def _lse_loss_kernel(
    parts_ptr, logits_ptr, labels_ptr, lse_ptr, loss_ptr, n_parts, parts_stride, logits_stride, ignore_index,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    # one row per program: lse = logsumexp of the row's partials (the logits GEMM's per-N-tile logsumexps);
    # loss = lse - the label's logit as stored (0 for an ignored label). Runs before the gradient pass
    # overwrites the logits.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_P)
    p = tl.load(parts_ptr + row * parts_stride + cols, mask=cols < n_parts, other=-float("inf"))
    m = tl.max(p, axis=0)
    lse = m + tl.log(tl.sum(tl.exp(p - m), axis=0))
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    z_label = tl.load(logits_ptr + row * logits_stride + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_label, 0.0))


def _require_triton(*tensors: Tensor) -> None:
    require_triton("cross-entropy")
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("cross-entropy kernels need a contiguous last dimension")


def _launch_config(V: int) -> dict:
    """cross_entropy's launch: the tuned block / warps, else by V."""
    block = space.value("cross_entropy", "triton_fused", "block_v") or min(4096, triton.next_power_of_2(V))
    warps = space.value("cross_entropy", "triton_fused", "num_warps")
    return dict(BLOCK_V=block, num_warps=warps or (8 if block >= 4096 else 4))


def _write_grad_launch() -> dict:
    """linear_cross_entropy's forward that also writes the gradient: a few programs per SM loop over the rows
    so that part of a row's second read finds it in L2 (space: ops/table.py)."""
    return {n: space.value("linear_cross_entropy", "triton_fused", n)
            for n in ("programs_per_sm", "block_v", "num_warps", "l2_hint")}


def _fwd_launch(V: int, rows: int, write_grad: bool, device: torch.device) -> tuple[int, dict]:
    """(grid size, kernel meta-parameters) for `_ce_fwd_kernel`; a CPU (the interpreter) counts as one SM."""
    if not write_grad:
        return rows, _launch_config(V) | {"L2_HINT": False}
    launch = _write_grad_launch()
    meta = dict(BLOCK_V=min(int(launch["block_v"]), triton.next_power_of_2(V)), num_warps=int(launch["num_warps"]),
                L2_HINT=bool(launch["l2_hint"]))  # fmt: skip
    if launch["programs_per_sm"] <= 0:
        return rows, meta
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(rows, round(launch["programs_per_sm"] * sms))), meta


def _unit(V: int, *tensors: Tensor) -> int:
    """8 when V, every row stride and every base address keep rows 16-byte aligned, else 1."""
    ok = V % 8 == 0 and all(t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0 for t in tensors)
    return 8 if ok else 1


def cross_entropy_fwd(
    logits: Tensor, labels: Tensor, *, scale: float = 1.0, write_grad: bool = False, grad_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row losses (rows,) fp32 and logsumexps (rows,) fp32 of scale * logits (rows, V). With
    `write_grad`, logits is overwritten by (grad_scale *) d(sum of losses)/d(logits)."""
    rows, V = logits.shape
    _require_triton(logits)
    assert labels.shape == (rows,) and labels.is_contiguous(), "labels: (rows,) contiguous"
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        u = _unit(V, logits)
        grid, meta = _fwd_launch(V, rows, write_grad, logits.device)
        _ce_fwd_kernel[(grid,)](
            logits, labels, losses, lse, grad_scale if grad_scale is not None else lse, rows, V // u,
            logits.stride(0) // u, scale, IGNORE_INDEX, WRITE_GRAD=write_grad, HAS_GRAD_SCALE=grad_scale is not None,
            UNIT=u, **meta,
        )  # fmt: skip
    return losses, lse


def one_pass_launch() -> dict[str, int | bool]:
    """The one-pass gradient kernel's launch when the logsumexp came from the logits GEMM's epilogue (quack_triton)."""
    value = lambda n: space.value("linear_cross_entropy", "quack_triton", n)  # noqa: E731
    return {"BLOCK_V": value("grad_block_v"), "num_warps": value("grad_num_warps"), "split": value("grad_split")}


def cross_entropy_bwd(
    logits: Tensor, labels: Tensor, lse: Tensor, dloss: Tensor, *, scale: float = 1.0, grad: Tensor | None = None,
    launch: dict[str, int | bool] | None = None,
) -> Tensor:
    """d(dloss * sum of losses)/d(logits) into `grad` (rows, V) (new when not given); dloss is a 0-dim
    device tensor (read by the kernel: no host sync). `launch`: BLOCK_V / num_warps (default by V), and
    split=True for a program per block of a row instead of per row."""
    return _grad_pass(logits, labels, lse, dloss, scale, grad, launch, sums=False)[0]


def _grad_pass(logits: Tensor, labels: Tensor, lse: Tensor, dloss: Tensor, scale: float, grad: Tensor | None,
               launch: dict[str, int | bool] | None, sums: bool) -> tuple[Tensor, Tensor | None]:
    """cross_entropy_bwd's launch; with `sums`, also each row's sum of exp(scale * logit - lse) (rows,) fp32."""
    rows, V = logits.shape
    grad = torch.empty_like(logits) if grad is None else grad
    _require_triton(logits, grad)
    dloss = dloss.to(device=logits.device, dtype=torch.float32).reshape(())
    meta = dict(_launch_config(V) if launch is None else launch)
    split = bool(meta.pop("split", False))
    n_blocks = triton.cdiv(V, meta["BLOCK_V"]) if split else 1  # programs per row
    parts = torch.empty(rows, n_blocks, dtype=torch.float32, device=logits.device) if sums else None
    if rows:
        u = _unit(V, logits, grad)
        _ce_bwd_kernel[(rows * n_blocks,)](
            logits, labels, lse, dloss, grad, parts if sums else lse, V // u, logits.stride(0) // u,
            grad.stride(0) // u, n_blocks, scale, IGNORE_INDEX, SPLIT=split, UNIT=u, SUMS=sums, **meta,
        )  # fmt: skip
    return grad, parts.sum(dim=1) if sums else None


# The registry op is a pair of `torch.library` custom ops (forward, backward) with fake implementations and
# a registered autograd formula, as flash4.py does: torch.compile keeps each as one opaque node and fuses
# the code around it. (Tracing the Triton launches instead fails: `_unit` reads data pointers.)
@torch.library.custom_op(f"{LIBRARY}::triton_ce_fwd", mutates_args=())
def triton_ce_fwd(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """logits (rows, V), labels (rows,) -> (sum of row losses 0-dim fp32, logsumexps (rows,) fp32)."""
    losses, lse = cross_entropy_fwd(logits, labels)
    return losses.sum(), lse


@triton_ce_fwd.register_fake
def _(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.custom_op(f"{LIBRARY}::triton_ce_bwd", mutates_args=())
def triton_ce_bwd(logits: Tensor, labels: Tensor, lse: Tensor, dloss: Tensor) -> Tensor:
    """d(dloss * loss sum)/d(logits), (rows, V) in logits' dtype."""
    return cross_entropy_bwd(logits, labels, lse, dloss)


@triton_ce_bwd.register_fake
def _(logits: Tensor, labels: Tensor, lse: Tensor, dloss: Tensor) -> Tensor:
    return torch.empty_like(logits)


def _ce_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _ce_backward(ctx, dloss: Tensor, _dlse: Tensor | None) -> tuple[Tensor, None]:
    logits, labels, lse = ctx.saved_tensors
    return triton_ce_bwd(logits, labels, lse, dloss), None


triton_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed token cross-entropy (0-dim fp32) over labels != -100; logits (..., V), labels (...)."""
    logits2 = logits.reshape(-1, logits.shape[-1])
    logits2 = logits2 if logits2.stride(-1) == 1 else logits2.contiguous()
    return triton_ce_fwd(logits2, labels.reshape(-1).contiguous())[0]


def cross_entropy_reference(logits: Tensor, labels: Tensor) -> Tensor:
    """The reference math (ops/cross_entropy/reference.py)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


# ---- fused with the output projection ------------------------------------------------------------

_FP32_ADDMM: dict[torch.device, bool] = {}  # device -> cuBLAS takes bf16/fp16 inputs with an fp32 output


def _fp32_addmm_works(device: torch.device) -> bool:
    """torch >= 2.8 has addmm(out_dtype=float32) on CUDA: dW accumulates each chunk's product in fp32
    without rounding it to bf16 first. Probed once per device (a tiny product against fp32 math)."""
    if device not in _FP32_ADDMM:
        try:
            a = torch.randn(8, 16, device=device, dtype=torch.bfloat16)
            b = torch.randn(16, 4, device=device, dtype=torch.bfloat16)
            acc = torch.ones(8, 4, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _FP32_ADDMM[device] = bool(torch.allclose(acc, 1 + a.float() @ b.float(), rtol=1e-3, atol=1e-3))
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_ADDMM[device] = False
    return _FP32_ADDMM[device]


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor, overwrite: bool = False) -> None:
    """acc (fp32) += a @ b; with `overwrite`, acc = a @ b (acc's old values, NaN included, are not read)."""
    beta = 0.0 if overwrite else 1.0
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif a.is_cuda and _fp32_addmm_works(a.device):
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    elif overwrite:
        acc.copy_(a @ b)
    else:  # the product rounds to a's dtype once per chunk before the fp32 sum
        acc.add_(a @ b)


def _quack_kernels() -> _quack.Kernels:
    if _quack.KERNELS is None:
        raise EngineError(f"linear_cross_entropy: the quack GEMMs cannot run: {_quack.UNAVAILABLE_REASON}")
    return _quack.KERNELS


def _mm(gemms: str, a: Tensor, b: Tensor, out: Tensor, site: str) -> None:
    """out = a @ b on cuBLAS (gemms "cublas") or on quack with `site`'s pinned config ("quack", "quack_lse")."""
    if gemms == "cublas":
        torch.mm(a, b, out=out)
    else:
        _quack_kernels().gemm_into(a, b, out, site)


def fused_linear_cross_entropy_fwd_bwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, logit_scale: float = 1.0, chunk_size: int = 4096,
    compute_dx: bool = True, compute_dw: bool = True, grad_scale: Tensor | None = None,
    dx_out: Tensor | None = None, dw_accum: Tensor | None = None, gemms: str = "cublas",
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """Loss and gradients of sum(CE(hidden @ weight^T / logit_scale, labels)) in one chunked pass.

    hidden (T, h), weight (V, h), labels (T,). Returns (loss_sum 0-dim fp32, n_valid 0-dim int64,
    dx (T, h) in hidden's dtype or None, dw (V, h) fp32 or None). Gradients are multiplied by
    `grad_scale` (a 0-dim device tensor, e.g. 1 / global token count) when given. dx goes into `dx_out`
    when given; dw is ADDED into `dw_accum` (fp32) when given (a main-grad buffer). dw's GEMM writes fp32
    even from bf16 inputs (cuBLAS is faster so at this shape). `gemms` names who runs the logits and dx GEMMs: "cublas"
    (torch.mm), "quack" (ops/_quack.py's pinned configs), or "quack_lse": quack, and with gradients at
    logit_scale 1 the logits GEMM's epilogue also gives each row's logsumexp per N-tile (from the fp32
    accumulator; `_lse_loss_kernel` folds them), so the gradient pass is one read + one write of the logits
    instead of two reads + one write; that pass also sums each row's exp(logit - lse), by which
    `_renormalize` makes the loss and both gradients those of the rounded logits, as the other modes'. dW's GEMM
    stays on cuBLAS (fp32 output)."""
    T, h = hidden.shape
    V = weight.shape[0]
    _require_triton(hidden, weight)
    if gemms not in ("cublas", "quack", "quack_lse"):
        raise ValueError(f"linear cross-entropy: gemms must be cublas, quack or quack_lse, not {gemms!r}")
    assert labels.shape == (T,) and labels.is_contiguous(), "labels: (T,) contiguous"
    need_grad = compute_dx or compute_dw
    chunk = max(1, min(chunk_size, T))
    logits = torch.empty(chunk, V, dtype=hidden.dtype, device=hidden.device)  # reused by every chunk
    losses = torch.empty(T, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(chunk, dtype=torch.float32, device=hidden.device)  # written, not needed after
    dx = (dx_out if dx_out is not None else torch.empty_like(hidden)) if compute_dx else None
    dw = None
    if compute_dw:
        dw = dw_accum if dw_accum is not None else torch.empty(V, h, dtype=torch.float32, device=hidden.device)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=hidden.device, dtype=torch.float32).reshape(())
    u = _unit(V, logits)
    for r0 in range(0, T, chunk):
        r1 = min(r0 + chunk, T)
        x, z, y = hidden[r0:r1], logits[: r1 - r0], labels[r0:r1]
        if gemms == "quack_lse" and need_grad and logit_scale == 1.0:
            # the GEMM's epilogue gives each row's logsumexps per N-tile: the gradient pass reads the logits once
            parts = _quack_kernels().gemm_lse(x, weight.t(), z, "output.logits")  # (c, N-tiles) logsumexps
            lse_c = lse[: r1 - r0]
            _lse_loss_kernel[(r1 - r0,)](parts, z, y, lse_c, losses[r0:r1], parts.shape[1], parts.stride(0),
                                         z.stride(0), IGNORE_INDEX, BLOCK_P=triton.next_power_of_2(parts.shape[1]))
            gs = grad_scale if grad_scale is not None else z.new_ones((), dtype=torch.float32)
            row_sums = _grad_pass(z, y, lse_c, gs, 1.0, z, one_pass_launch(), sums=True)[1]
            inv_sums = _renormalize(z, y, row_sums, gs, losses[r0:r1])
        else:
            inv_sums = None
            _mm(gemms, x, weight.t(), z, "output.logits")  # (c, V) in hidden's dtype
            grid, meta = _fwd_launch(V, r1 - r0, need_grad, z.device)
            _ce_fwd_kernel[(grid,)](
                z, y, losses[r0:r1], lse, grad_scale if grad_scale is not None else lse, r1 - r0, V // u,
                z.stride(0) // u, 1.0 / logit_scale, IGNORE_INDEX,
                WRITE_GRAD=need_grad, HAS_GRAD_SCALE=grad_scale is not None, UNIT=u, **meta,
            )  # fmt: skip
        if compute_dx:
            _mm(gemms, z, weight, dx[r0:r1], "output.dgrad")  # (c, h)
            if inv_sums is not None:
                dx[r0:r1].mul_(inv_sums[:, None])  # in fp32, rounded back to dx's dtype
        if compute_dw:
            xs = x if inv_sums is None else (x * inv_sums[:, None]).to(x.dtype)
            _accumulate_mm(dw, z.t(), xs, overwrite=r0 == 0 and dw_accum is None)  # (V, h)
    return losses.sum(), (labels != IGNORE_INDEX).sum(), dx, dw


def _renormalize(grad: Tensor, labels: Tensor, row_sums: Tensor, grad_scale: Tensor, losses: Tensor) -> Tensor:
    """The epilogue's logsumexp (from the fp32 accumulators) against the rounded logits the gradient pass read:
    each row's exp(logit - lse) sums to S, not 1. The exact gradient is grad / S with its label entry moved by
    grad_scale * (1 - S) / S; this adds grad_scale * (1 - S) to the label entry in place (one element per row)
    and returns 1 / S, by which the caller scales the dx GEMM's rows and x for the dW GEMM. The losses get
    log S, so they are the rounded logits' logsumexp minus the label's logit."""
    valid = labels != IGNORE_INDEX
    rows = torch.arange(grad.shape[0], device=grad.device)
    cols = torch.where(valid, labels, 0)
    mult = torch.where(valid, grad_scale, 0.0)
    grad[rows, cols] = (grad[rows, cols].float() + mult * (1.0 - row_sums)).to(grad.dtype)
    losses.add_(torch.where(valid, torch.log(row_sums), 0.0))
    return 1.0 / row_sums


# As a `torch.library` custom-op pair, so torch.compile keeps each direction as one node (the launches read
# data pointers, which tracing cannot). With gradients, the forward computes them (the CE kernel overwrites
# the logits with their gradient, then the dx / dw GEMMs, each only when asked for: an empty tensor
# otherwise); the backward only scales dx and dw by the incoming gradient, which touches (T, h) and (V, h),
# never a (T, V) tensor.
@torch.library.custom_op(f"{LIBRARY}::linear_ce_fwd_bwd", mutates_args=())
def linear_ce_fwd_bwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, logit_scale: float, chunk_size: int, compute_dx: bool,
    compute_dw: bool, gemms: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """hidden (T, h), weight (V, h), labels (T,) -> (loss sum 0-dim fp32, dx (T, h) in hidden's dtype, dw (V, h)
    fp32), the gradients those of the loss sum; dx / dw empty when not computed."""
    loss, _, dx, dw = fused_linear_cross_entropy_fwd_bwd(
        hidden, weight, labels, logit_scale=logit_scale, chunk_size=chunk_size, compute_dx=compute_dx,
        compute_dw=compute_dw, gemms=gemms,
    )  # fmt: skip
    dx = hidden.new_empty(0) if dx is None else dx
    return loss, dx, weight.new_empty(0, dtype=torch.float32) if dw is None else dw


@linear_ce_fwd_bwd.register_fake
def _(hidden: Tensor, weight: Tensor, labels: Tensor, logit_scale: float, chunk_size: int, compute_dx: bool,
      compute_dw: bool, gemms: str) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    dx = torch.empty_like(hidden) if compute_dx else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape if compute_dw else (0,), dtype=torch.float32)
    return hidden.new_empty((), dtype=torch.float32), dx, dw


@torch.library.custom_op(f"{LIBRARY}::linear_ce_loss", mutates_args=())
def linear_ce_loss(hidden: Tensor, weight: Tensor, labels: Tensor, logit_scale: float, chunk_size: int,
                   gemms: str) -> Tensor:  # fmt: skip
    """The loss sum alone (no gradients: one read of each logits chunk)."""
    loss, _, _, _ = fused_linear_cross_entropy_fwd_bwd(
        hidden, weight, labels, logit_scale=logit_scale, chunk_size=chunk_size, compute_dx=False, compute_dw=False,
        gemms=gemms,
    )
    return loss


@linear_ce_loss.register_fake
def _(hidden: Tensor, weight: Tensor, labels: Tensor, logit_scale: float, chunk_size: int, gemms: str) -> Tensor:
    return hidden.new_empty((), dtype=torch.float32)


def _linear_ce_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2])
    ctx.weight_dtype, ctx.computed = inputs[1].dtype, inputs[5:7]


def _linear_ce_backward(ctx, dloss: Tensor, _ddx, _ddw) -> tuple:
    dx, dw = ctx.saved_tensors
    dx = (dx.float() * dloss).to(dx.dtype) if ctx.computed[0] else None
    dw = (dw * dloss).to(ctx.weight_dtype) if ctx.computed[1] else None
    return dx, dw, None, None, None, None, None, None


linear_ce_fwd_bwd.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup_context)


def _linear_ce_sum(hidden: Tensor, weight: Tensor, labels: Tensor, logit_scale: float, chunk_size: int,
                   gemms: str = "cublas") -> Tensor:  # fmt: skip
    """The loss sum through the custom ops, computing the gradients that autograd will ask for."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
    labels2 = labels.reshape(-1).contiguous()
    grad = torch.is_grad_enabled()
    compute_dx, compute_dw = grad and hidden.requires_grad, grad and weight.requires_grad
    if compute_dx or compute_dw:
        return linear_ce_fwd_bwd(h2, weight, labels2, logit_scale, chunk_size, compute_dx, compute_dw, gemms)[0]
    return linear_ce_loss(h2, weight, labels2, logit_scale, chunk_size, gemms)


def fused_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, logit_scale: float = 1.0, chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """(sum of CE(hidden @ weight^T / logit_scale, labels) over labels != -100 as fp32, count of those
    labels as int64), both 0-dim; hidden (..., h), weight (V, h), labels (...). Differentiable in hidden
    and weight; at most `chunk_size` rows of logits exist at once."""
    return _linear_ce_sum(hidden, weight, labels, logit_scale, chunk_size), (labels != IGNORE_INDEX).sum()


def fused_linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, labels: Tensor, logit_scale: float = 1.0, chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """The reference math: the whole logits, then the reference loss (`chunk_size` is ignored)."""
    logits = (hidden / logit_scale) @ weight.t()
    return cross_entropy_reference(logits, labels), (labels != IGNORE_INDEX).sum()


# ---- the registry op linear_cross_entropy(x, weight, labels) ---------------------------------------

# Tokens per chunk of the registry op; its logits buffer is (chunk, V) in the compute dtype: as fast as one
# chunk of the whole micro batch at a quarter of the memory (benchmarks/results/engine-0.5b-linear-ce-*).
LINEAR_CE_CHUNK = 8192


def linear_cross_entropy(x: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """The registry op: sum of CE(x @ weight^T, labels) over labels != -100 (0-dim fp32); x (..., h),
    weight (V, h), labels (...). Same signature as reference.py's."""
    return _linear_ce_sum(x, weight, labels, 1.0, LINEAR_CE_CHUNK)
