"""The SwiGLU MLP with SwiGLU in the fc1 GEMM's epilogue and its gradient in the fc2 dgrad GEMM's epilogue
(quack's `gemm_gated` / `gemm_dact`, `quack-kernels`, sm90+).

Why: one GEMM with the dSwiGLU epilogue (its SM90 tile config a tunable, ops/table.py) instead of cuBLAS's
fc2 dgrad then a separate dSwiGLU pass; it also recomputes postact = silu(gate) * up in that epilogue, so the
forward no longer keeps postact (f x tokens bf16 per layer) for fc2's weight gradient.

    forward   preact, postact = gemm_gated(x, W1i^T)           quack (heuristic config, as quack_gated.py)
              out = postact @ W2^T                              cuBLAS
              saved: x, W1i, W2, preact
    backward  dpreact, postact = gemm_dgated(dout, W2, preact)  quack, pinned SM90 config
              dW2 = dout^T @ postact; dx = dpreact @ W1i; dW1i = dpreact^T @ x     cuBLAS

W1i interleaves gate and up rows (gate_0, up_0, gate_1, ...), built from the HF-named parameters each call by
quack_gated.interleave, so checkpoints and exports are unchanged. Both directions are `torch.library` custom ops
with fakes (torch.compile keeps each one node); bf16 / fp16 CUDA tensors on compute capability 9.0+.
`_kernels` is the one seam the CPU tests replace with plain math following quack's contract.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ...core.errors import EngineError
from .. import LIBRARY, _quack
from .._hopper import require_hopper_half
from .quack_gated import interleave

_SITE = "mlp.fc2_dgrad_dswiglu"  # its SM90 tile config: _quack.SM90_TILES


class Kernels(NamedTuple):
    # gemm_gated(x (M, h), W1i^T (h, 2f)) -> (preact (M, 2f) = x @ W1i^T, silu(preact[:, 0::2]) * preact[:, 1::2])
    gemm_gated: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    # gemm_dgated(dout (M, h), W2 (h, f), preact (M, 2f)) -> (dpreact (M, 2f) interleaved, postact (M, f))
    gemm_dgated: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _load() -> tuple[Kernels | None, str | None]:
    if _quack.KERNELS is None:
        return None, _quack.UNAVAILABLE_REASON

    def k_gemm_gated(x: Tensor, w1it: Tensor) -> tuple[Tensor, Tensor]:
        require_hopper_half(x, "mlp=quack_dgated", "unfused")
        return _quack.KERNELS.gemm_gated(x, w1it)

    def k_gemm_dgated(dout: Tensor, w2: Tensor, preact: Tensor) -> tuple[Tensor, Tensor]:
        return _quack.KERNELS.gemm_dgated(dout, w2, preact, _SITE)

    return Kernels(k_gemm_gated, k_gemm_dgated), None


_kernels, UNAVAILABLE_REASON = _load()


def _require_kernels() -> Kernels:
    if _kernels is None:
        raise EngineError(f"ops.mlp=quack_dgated: {UNAVAILABLE_REASON}")
    return _kernels


def _check(what: str, got: Tensor, want: tuple[int, ...]) -> None:
    if tuple(got.shape) != want:
        raise EngineError(f"quack_dgated: {what} kernel returned {tuple(got.shape)}, expected {want}")


@torch.library.custom_op(f"{LIBRARY}::quack_mlp_fwd", mutates_args=())
def quack_mlp_fwd(x: Tensor, w1i: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, h), w1i (2f, h) interleaved, w2 (h, f) -> (out (M, h), preact (M, 2f) for the backward)."""
    preact, postact = _require_kernels().gemm_gated(x.contiguous(), w1i.T)
    M, f = x.shape[0], w1i.shape[0] // 2
    _check("gated", preact, (M, 2 * f))
    _check("gated", postact, (M, f))
    return postact @ w2.T, preact


@quack_mlp_fwd.register_fake
def _(x: Tensor, w1i: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty((x.shape[0], w1i.shape[0]))


@torch.library.custom_op(f"{LIBRARY}::quack_mlp_dgated", mutates_args=())
def quack_mlp_dgated(dout: Tensor, w2: Tensor, preact: Tensor) -> tuple[Tensor, Tensor]:
    """dout (M, h), w2 (h, f), preact (M, 2f) -> (dpreact (M, 2f) interleaved, postact (M, f) recomputed)."""
    dpreact, postact = _require_kernels().gemm_dgated(dout.contiguous(), w2, preact)
    M, f = dout.shape[0], w2.shape[1]
    _check("dgated", dpreact, (M, 2 * f))
    _check("dgated", postact, (M, f))
    return dpreact, postact


@quack_mlp_dgated.register_fake
def _(dout: Tensor, w2: Tensor, preact: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(preact), preact.new_empty((preact.shape[0], w2.shape[1]))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs, output[1])


def _backward(ctx, dout: Tensor, _dpreact: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    x, w1i, w2, preact = ctx.saved_tensors
    dpreact, postact = quack_mlp_dgated(dout, w2, preact)
    return dpreact @ w1i, dpreact.T @ x, dout.T @ postact


quack_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def mlp(x: Tensor, gate_w: Tensor, up_w: Tensor, down_w: Tensor) -> Tensor:
    """down(silu(x @ gate^T) * (x @ up^T)); x (..., h) -> (..., h)."""
    w1i = interleave(gate_w, up_w)  # (2f, h): gate_0, up_0, gate_1, ...
    y, _ = quack_mlp_fwd(x.reshape(-1, x.shape[-1]), w1i, down_w)
    return y.view(*x.shape[:-1], down_w.shape[0])
