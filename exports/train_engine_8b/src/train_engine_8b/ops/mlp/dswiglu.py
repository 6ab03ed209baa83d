"""The SwiGLU gradient on quack's interleaved layout: preact (M, 2f) = (gate_0, up_0, gate_1, ...), the
output gradient dpost (M, f) -> dpreact (M, 2f) in the same interleaved layout. quack_gated.py's backward.

Why a kernel: Inductor's fusion of the plain math (`reference`) does not vectorize its stride-2 gate / up
loads and the final stack. Here each program loads whole (gate, up) pairs, so
every access is contiguous; the call moves 5 * M * f elements, the floor at HBM bandwidth.

`dswiglu` runs the Triton kernel on CUDA (as the custom op `<package>::dswiglu_interleaved`, so
torch.compile keeps it as one node) and the reference elsewhere. fp32 math, one rounding at the store.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import LIBRARY, space
from .._triton import HAS_TRITON, require_triton, tl, triton


def reference(preact: Tensor, dpost: Tensor) -> Tensor:
    """Plain math, at least fp32 inside; the result in preact's dtype."""
    acc = torch.promote_types(preact.dtype, torch.float32)
    g, u, d = preact[..., 0::2].to(acc), preact[..., 1::2].to(acc), dpost.to(acc)
    sig = torch.sigmoid(g)
    dg = d * u * sig * (1 + g * (1 - sig))  # d silu(g) = sig * (1 + g * (1 - sig))
    du = d * g * sig
    return torch.stack((dg, du), dim=-1).flatten(-2).to(preact.dtype)


@triton.jit
def _dswiglu_kernel(pre_ptr, dpost_ptr, dpre_ptr, n_pairs, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # pair index = element of dpost
    mask = idx < n_pairs
    pair = idx[:, None] * 2 + tl.arange(0, 2)[None, :]  # (BLOCK, 2): contiguous in memory
    pre = tl.load(pre_ptr + pair, mask=mask[:, None], other=0.0).to(tl.float32)
    g, u = tl.split(pre)
    d = tl.load(dpost_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = d * u * sig * (1.0 + g * (1.0 - sig))
    du = d * g * sig
    tl.store(dpre_ptr + pair, tl.join(dg, du).to(dpre_ptr.dtype.element_ty), mask=mask[:, None])


def launch(preact: Tensor, dpost: Tensor, out: Tensor | None = None) -> Tensor:
    """The Triton kernel on contiguous preact (..., 2f) and dpost (..., f); writes `out` when given."""
    require_triton("interleaved SwiGLU gradient")
    if preact.shape[:-1] != dpost.shape[:-1] or preact.shape[-1] != 2 * dpost.shape[-1]:
        raise ValueError(f"dswiglu: preact {tuple(preact.shape)} is not the interleaved pair of dpost {tuple(dpost.shape)}")
    preact, dpost = preact.contiguous(), dpost.contiguous()
    out = torch.empty_like(preact) if out is None else out
    n_pairs = dpost.numel()
    if n_pairs:
        block = space.value("mlp", "quack_gated", "dswiglu_block")  # (gate, up) pairs per program
        _dswiglu_kernel[(triton.cdiv(n_pairs, block),)](preact, dpost, out, n_pairs, BLOCK=block,
                                                         num_warps=space.value("mlp", "quack_gated", "dswiglu_num_warps"))
    return out


@torch.library.custom_op(f"{LIBRARY}::dswiglu_interleaved", mutates_args=())
def _dswiglu_op(preact: Tensor, dpost: Tensor) -> Tensor:
    return launch(preact, dpost)


@_dswiglu_op.register_fake
def _(preact: Tensor, dpost: Tensor) -> Tensor:
    return torch.empty_like(preact, memory_format=torch.contiguous_format)


def dswiglu(preact: Tensor, dpost: Tensor) -> Tensor:
    """dpreact for the interleaved layout: the Triton kernel on CUDA, the reference elsewhere."""
    if preact.is_cuda and HAS_TRITON:
        return _dswiglu_op(preact, dpost)
    return reference(preact, dpost)
