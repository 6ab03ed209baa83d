"""AdamW over every parameter tensor in ONE Triton launch, with the gradient norm in one more.

    adamw(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decays,
          param_copies=None, clip_coef=None)          the registry signature (reference.py), plus:
    - param_copies: the compute-dtype (bf16) parameters, written from the updated fp32 masters in the
      same pass (no separate copy kernel);
    - clip_coef: a 0-dim fp32 device tensor multiplying every gradient as it is read (gradient
      clipping without a pass that rewrites the gradients).
    grad_sq_sum(grads) -> 0-dim fp32: the sum of squares of all gradients, one read (all-reduce it
    across ranks when the gradients are sharded). The clip factor: optim.clip_coefficient.

The tensors stay where they are (separate allocations, or views of one flat buffer: a flat master
buffer with per-range decay is passed as its views). A launch plan lists work items (tensor, start,
end, decays?), cached by the tensors' sizes; the kernel finds each tensor through device tables of data
pointers, cached by address, so one launch covers every parameter, norm weights (weight decay 0) in the
same launch as the matrices (one launch per distinct nonzero decay value beyond the first). An eager
step copies nothing to the device: the coefficients are kernel arguments.

Math: torch.optim.AdamW's (gates/stacks/torch_ref/optim.py), per element, fp32:
    g = grad * clip;  p *= 1 - lr*wd;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
    p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
with IEEE-rounded division and square root (as torch's), coefficients computed in fp64 then rounded to
fp32. `lr` and `step` may be 0-dim device tensors instead of numbers (fp64 for the same bits): the
coefficients are then computed on the device and the step can be captured in a CUDA graph (after one
eager step has built the cached tables).

Requirements: masters and moments fp32; all grads one dtype (fp32 or bf16/fp16); all copies one dtype.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from .reference import adamw as _reference_adamw

from .. import space
from .._triton import HAS_TRITON, require_triton, tl, triton  # noqa: F401 - HAS_TRITON: read by the registry

_BLOCK = 1024  # grad_sq_sum's elements per loop iteration: 8 fp32 per thread at 4 warps
_CHUNK = 16 * _BLOCK  # elements per work item: ~30k items for 0.5B parameters, a few waves of programs


@triton.jit
def _table_ptr(table, i, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(table + i).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # the host checked 16-byte alignment: lets the loads go 16 bytes wide
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _work_item(plan_ptr, ALIGNED: tl.constexpr):
    item = plan_ptr + tl.program_id(0).to(tl.int64) * 4
    t = tl.load(item)
    start = tl.load(item + 1)
    end = tl.load(item + 2)
    decays = tl.load(item + 3)
    if ALIGNED:  # starts are multiples of the chunk, ends of 8 (checked on the host)
        start = tl.multiple_of(start, 16)
        end = tl.multiple_of(end, 8)
    return t, start, end, decays


@triton.jit
def _adamw_kernel(
    plan_ptr, p_table, g_table, m_table, v_table, c_table, coef_ptr, clip_ptr,
    step_size, bc2, keep_decayed, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    G_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, HAS_COPY: tl.constexpr, HAS_CLIP: tl.constexpr,
    COEFS_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # step_size = lr / (1 - b1^t), bc2 = 1 - b2^t, keep_decayed = 1 - lr * wd: arguments, or read from
    # coef_ptr when lr / step live on the device (CUDA graphs)
    if COEFS_ON_DEVICE:
        step_size = tl.load(coef_ptr)
        bc2 = tl.load(coef_ptr + 1)
        keep_decayed = tl.load(coef_ptr + 2)
    t, start, end, decays = _work_item(plan_ptr, ALIGNED)
    p_ptr = _table_ptr(p_table, t, tl.float32, ALIGNED)
    g_ptr = _table_ptr(g_table, t, G_DTYPE, ALIGNED)
    m_ptr = _table_ptr(m_table, t, tl.float32, ALIGNED)
    v_ptr = _table_ptr(v_table, t, tl.float32, ALIGNED)
    c_ptr = _table_ptr(c_table, t, C_DTYPE, ALIGNED)  # without copies the table is p_table: a valid read
    bc2_block = tl.full((BLOCK,), 1.0, tl.float32) * bc2  # div_rn does not broadcast a scalar
    keep = tl.where(decays != 0, keep_decayed, 1.0)
    clip = 1.0
    if HAS_CLIP:
        clip = tl.load(clip_ptr)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * clip
        p = tl.load(p_ptr + offs, mask=mask, other=0.0) * keep
        m = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + one_minus_beta1 * g
        v = tl.load(v_ptr + offs, mask=mask, other=0.0) * beta2 + one_minus_beta2 * g * g
        denom = tl.sqrt_rn(tl.div_rn(v, bc2_block)) + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_COPY:
            tl.store(c_ptr + offs, p.to(C_DTYPE), mask=mask)


@triton.jit
def _sq_sum_kernel(plan_ptr, g_table, partial_ptr, G_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, start, end, _ = _work_item(plan_ptr, ALIGNED)
    g_ptr = _table_ptr(g_table, t, G_DTYPE, ALIGNED)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
        acc += g * g
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


# ---- host side ------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_PLANS: dict[tuple, Tensor] = {}  # (device, sizes, decay flags) -> work items
_TABLES: dict[tuple, Tensor] = {}  # (device, addresses) -> pointer tables


def _tl_dtype(dtype: torch.dtype):
    if dtype not in _TL_DTYPES:
        raise ValueError(f"the Triton AdamW takes fp32 / bf16 / fp16 gradients and copies, not {dtype}")
    return getattr(tl, _TL_DTYPES[dtype])


class _Deferred:
    """Inside `deferred_tables`: where missed tables are carved from, and what fills them on exit."""

    def __init__(self, reserve: Tensor):
        self.reserve, self.used, self.pending = reserve, 0, []

    def take(self, host: Tensor) -> Tensor:
        n = host.numel()
        if self.used + n > self.reserve.numel():
            raise RuntimeError(f"deferred_tables: the reserve holds {self.reserve.numel()} entries, the tables "
                               f"need more than {self.used + n}")
        table = self.reserve[self.used : self.used + n].view(host.shape)
        self.used += n
        self.pending.append((table, host))
        return table


_DEFERRED: _Deferred | None = None


def _to_device(rows: list, device: torch.device) -> Tensor:
    """A small int64 table on the device; from pinned memory without a host sync on CUDA. Inside
    `deferred_tables` the table is a piece of the reserve, filled when the context exits."""
    host = torch.tensor(rows, dtype=torch.int64)
    if _DEFERRED is not None:
        return _DEFERRED.take(host)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


@contextlib.contextmanager
def deferred_tables(reserve: Tensor) -> Iterator[list[Tensor]]:
    """Capture-safe launches (cuda_graph.py). A stream capture records a kernel's arguments, not what its
    tables hold, and may not copy from host memory; the gradient buffers a capture allocates have new
    addresses, so their tables miss the caches. Inside this context a missed table is a piece of `reserve`
    (int64, on the device, allocated before the capture and kept as long as the graph): not memory the
    capture allocates, which belongs to the graph and may be shared with a temporary that runs earlier
    in the same replay. On exit (after the capture ended) each is filled from its host rows. Yields the
    list of those tables."""
    global _DEFERRED
    if _DEFERRED is not None:
        raise RuntimeError("deferred_tables does not nest")
    _DEFERRED, kept = _Deferred(reserve.view(-1)), []
    try:
        yield kept
    finally:
        state, _DEFERRED = _DEFERRED, None
        for table, host in state.pending:
            table.copy_(host)
            kept.append(table)


def _cached(cache: dict, key: tuple, build) -> Tensor:
    if key not in cache:
        if len(cache) >= 64:  # new tensors every step (grads freed and reallocated): stay bounded
            cache.clear()
        cache[key] = build()
    return cache[key]


def _launch_tables(tensor_lists: list[list[Tensor]], decay_flags: list[int]) -> tuple[Tensor, Tensor, bool]:
    """(work items (K, 4) int64 [tensor, start, end, decays], pointer tables (lists, n) int64, aligned)."""
    first, device = tensor_lists[0], tensor_lists[0][0].device
    sizes = tuple(t.numel() for t in first)
    addresses = tuple(tuple(t.data_ptr() for t in ts) for ts in tensor_lists)
    items = lambda: [  # noqa: E731
        (i, start, min(start + _CHUNK, n), flag)
        for i, (n, flag) in enumerate(zip(sizes, decay_flags))
        for start in range(0, n, _CHUNK)
    ]
    plan = _cached(_PLANS, (device, sizes, tuple(decay_flags)), lambda: _to_device(items(), device).reshape(-1, 4))
    tables = _cached(_TABLES, (device, addresses), lambda: _to_device([list(a) for a in addresses], device))
    aligned = all(a % 16 == 0 for a_list in addresses for a in a_list) and all(n % 8 == 0 for n in sizes)
    return plan, tables, aligned


def _check(params: list[Tensor], others: list[list[Tensor]]) -> None:
    require_triton("AdamW")
    for ts in [params, *others]:
        if len(ts) != len(params):
            raise ValueError("AdamW: every tensor list must have one tensor per parameter")
        for t, p in zip(ts, params):
            if t.numel() != p.numel() or not t.is_contiguous() or t.device != p.device:
                raise ValueError("AdamW: tensors must be contiguous, on one device, sized like their parameter")
    if len({t.dtype for t in others[0]}) > 1:
        raise ValueError("AdamW: all gradients must share one dtype")


def _coefficients(lr, step, beta1: float, beta2: float, wd: float, device) -> tuple[float, float, float, Tensor | None]:
    """(lr / bc1, bc2, 1 - lr*wd, None) in fp64 from numbers; from device tensors the same three as an
    fp32 device tensor (and placeholders): nothing is read on the host either way."""
    if isinstance(lr, Tensor) or isinstance(step, Tensor):
        lr = torch.as_tensor(lr, dtype=torch.float64, device=device)
        step = torch.as_tensor(step, dtype=torch.float64, device=device)
        bc1, bc2 = 1 - torch.pow(beta1, step), 1 - torch.pow(beta2, step)
        return 1.0, 1.0, 1.0, torch.stack([lr / bc1, bc2, 1 - lr * wd]).float()
    return lr / (1 - beta1**step), 1 - beta2**step, 1 - lr * wd, None


@torch.no_grad()
def adamw(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
    step, lr, beta1: float, beta2: float, eps: float, weight_decays: list[float],
    param_copies: list[Tensor] | None = None, clip_coef: Tensor | None = None,
) -> None:  # fmt: skip
    """One AdamW step, in place on params (fp32 masters), exp_avgs and exp_avg_sqs; see the module doc."""
    if not params:
        return
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([param_copies] if param_copies is not None else [])
    _check(params, lists[1:])
    if any(t.dtype != torch.float32 for ts in (params, exp_avgs, exp_avg_sqs) for t in ts):
        raise ValueError("the Triton AdamW keeps masters and moments in fp32")
    device = params[0].device
    clip = clip_coef.to(device=device, dtype=torch.float32).reshape(()) if clip_coef is not None else None
    # one launch per distinct nonzero decay value (usually one); undecayed tensors ride with the first
    values = sorted({float(wd) for wd in weight_decays if wd}) or [0.0]
    for j, wd in enumerate(values):
        idx = [i for i, w in enumerate(weight_decays) if float(w) == wd or (j == 0 and not w)]
        flags = [int(bool(weight_decays[i])) for i in idx]
        plan, tables, aligned = _launch_tables([[ts[i] for i in idx] for ts in lists], flags)
        step_size, bc2, keep, coefs = _coefficients(lr, step, beta1, beta2, wd, device)
        copy_dtype = param_copies[0].dtype if param_copies else torch.float32
        _adamw_kernel[(plan.shape[0],)](
            plan, tables[0], tables[1], tables[2], tables[3], tables[4] if param_copies is not None else tables[0],
            coefs if coefs is not None else plan, clip if clip is not None else plan,
            step_size, bc2, keep, beta1, 1 - beta1, beta2, 1 - beta2, eps,
            G_DTYPE=_tl_dtype(grads[0].dtype), C_DTYPE=_tl_dtype(copy_dtype),
            HAS_COPY=param_copies is not None, HAS_CLIP=clip is not None, COEFS_ON_DEVICE=coefs is not None,
            ALIGNED=aligned, BLOCK=space.value("adamw", "triton_fused", "block"),
            num_warps=space.value("adamw", "triton_fused", "num_warps"),
        )  # fmt: skip


@torch.no_grad()
def grad_sq_sum(grads: list[Tensor]) -> Tensor:
    """sum(g^2) over every element of every gradient, 0-dim fp32 (per-item fp32 partials, then a
    deterministic sum)."""
    if not grads:
        return torch.zeros(())
    _check(grads, [grads])
    plan, tables, aligned = _launch_tables([grads], [0] * len(grads))
    partial = torch.empty(plan.shape[0], dtype=torch.float32, device=grads[0].device)
    _sq_sum_kernel[(plan.shape[0],)](
        plan, tables[0], partial, G_DTYPE=_tl_dtype(grads[0].dtype), ALIGNED=aligned, BLOCK=_BLOCK, num_warps=4
    )
    return partial.sum()


def adamw_reference(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
    step, lr, beta1: float, beta2: float, eps: float, weight_decays: list[float],
    param_copies: list[Tensor] | None = None, clip_coef: Tensor | None = None,
) -> None:  # fmt: skip
    """The same signature in plain torch: ops/adamw/reference.py on the clipped gradients (upcast to the
    masters' dtype), then the copies."""
    with torch.no_grad():
        grads = [g.to(p.dtype) * clip_coef if clip_coef is not None else g.to(p.dtype) for g, p in zip(grads, params)]
        _reference_adamw(params, grads, exp_avgs, exp_avg_sqs, step=int(step), lr=float(lr), beta1=beta1,
                         beta2=beta2, eps=eps, weight_decays=weight_decays)  # fmt: skip
        for c, p in zip(param_copies or [], params):
            c.copy_(p)


def grad_sq_sum_reference(grads: list[Tensor]) -> Tensor:
    """sum(g^2) in >= fp32 (fp64 gradients stay fp64)."""
    dtype = torch.promote_types(grads[0].dtype, torch.float32)
    return sum((g.to(dtype).pow(2).sum() for g in grads), torch.zeros((), dtype=dtype, device=grads[0].device))
