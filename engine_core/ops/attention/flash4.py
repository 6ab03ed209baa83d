"""Causal GQA attention through FlashAttention-4 (`flash-attn-4`, CuTeDSL kernels for sm90 / sm100).

Why a custom op: FA4's own entry point is an `autograd.Function` that torch.compile cannot trace, and a
graph break around it cost more than the kernel saved. Here forward and
backward are two `torch.library` custom ops with fake (shape-only) implementations and a registered
autograd formula, so the compiler sees one opaque node per direction and fuses everything around it.

    flash4_fwd(q, k, v) -> (o, lse)                 lse (B, n, S) float32, the softmax log-normalizer
    flash4_bwd(q, k, v, o, do, lse) -> (dq, dk, dv)

Same layout as reference.py: q (B, S, n, d), k / v (B, S, g, d), o (B, S, n, d): FA4's own layout, so
nothing is transposed. bf16 / fp16 on a CUDA device of compute capability 9.0+ only; other inputs raise.

It calls FA4's `_flash_attn_fwd` / `_flash_attn_bwd` (flash-attn-4 4.0.0b36): the public function has no
separate backward. When the package is missing this module still imports and `UNAVAILABLE_REASON` says
why (the registry then leaves `flash4` out). `_kernels` is the one seam the CPU tests replace.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ...core.env import default_fa4_disk_cache
from ...core.errors import EngineError
from .. import LIBRARY, space
from .._hopper import gpu_too_old, require_hopper_half


def fwd_launch() -> dict:
    """Extra keyword arguments of FA4's forward (tile_mn, intra_wg_overlap, pack_gqa): the tuned ones (None: FA4's)."""
    names = {"fwd_tile_mn": "tile_mn", "fwd_intra_wg_overlap": "intra_wg_overlap", "fwd_pack_gqa": "pack_gqa"}
    values = {kw: space.value("attention", "flash4", n) for n, kw in names.items()}
    return {kw: v for kw, v in values.items() if v is not None}


class Kernels(NamedTuple):
    fwd: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # (q, k, v) -> (o, lse)
    bwd: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def _load() -> tuple[Kernels | None, str | None]:
    default_fa4_disk_cache()
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    except Exception as e:  # noqa: BLE001 - missing package, or CuTeDSL / CUDA libraries it cannot load
        return None, f"flash-attn-4 is not importable ({type(e).__name__}: {str(e)[:200]})"
    if reason := gpu_too_old("FA4"):
        return None, reason

    def fwd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        require_hopper_half(q, "attention=flash4", "sdpa")
        out, lse = _flash_attn_fwd(q, k, v, causal=True, return_lse=True, **fwd_launch())[:2]
        return out.contiguous(), lse.contiguous()

    def bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # deterministic (semaphore-ordered dq accumulation) when torch is asked for it, as the probes do
        dq, dk, dv = _flash_attn_bwd(q, k, v, o, do.contiguous(), lse, causal=True,
                                     deterministic=torch.are_deterministic_algorithms_enabled())[:3]
        return dq.contiguous(), dk.contiguous(), dv.contiguous()

    return Kernels(fwd, bwd), None


_kernels, UNAVAILABLE_REASON = _load()


@torch.library.custom_op(f"{LIBRARY}::flash4_fwd", mutates_args=())
def flash4_fwd(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if _kernels is None:
        raise EngineError(f"ops.attention=flash4: {UNAVAILABLE_REASON}")
    out, lse = _kernels.fwd(q, k, v)
    B, S, n, _ = q.shape
    if tuple(lse.shape) != (B, n, S):  # the fake below promises this layout to the compiler
        raise EngineError(f"flash4: kernel returned lse of shape {tuple(lse.shape)}, expected {(B, n, S)}")
    return out, lse


@flash4_fwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, S, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, n, S), dtype=torch.float32)  # contiguous, as the kernel's


@torch.library.custom_op(f"{LIBRARY}::flash4_bwd", mutates_args=())
def flash4_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if _kernels is None:
        raise EngineError(f"ops.attention=flash4: {UNAVAILABLE_REASON}")
    return _kernels.bwd(q, k, v, o, do, lse)


@flash4_bwd.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse)


def _backward(ctx, do: Tensor, _dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, o, lse = ctx.saved_tensors
    return flash4_bwd(q, k, v, o, do, lse)


flash4_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return flash4_fwd(q, k, v)[0]
