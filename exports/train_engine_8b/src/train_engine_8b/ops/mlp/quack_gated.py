"""The SwiGLU MLP with SwiGLU in the fc1 GEMM's epilogue (quack's `gemm_gated`, `quack-kernels`, sm90+).

Why: the standalone SwiGLU forward pass runs at HBM bandwidth; computing it in the fc1 epilogue removes it.

    forward   preact, postact = gemm_gated(x, W1i^T)     quack: fc1 with silu(gate) * up in the epilogue
              out = postact @ W2^T                       torch (cuBLAS)
    backward  dpost = dout @ W2                          torch (cuBLAS)
              dpreact = dSwiGLU(preact, dpost)           dswiglu.py: one Triton pass over the pairs
              dx = dpreact @ W1i; dW1i = dpreact^T @ x   torch (cuBLAS)

Only the forward uses quack here; quack_dgated.py also moves dSwiGLU into the fc2 dgrad's epilogue (the CUDA
default). The other MLP GEMMs stay on cuBLAS, faster than quack's heuristic configs at these shapes (measurements:
benchmarks/results). The dSwiGLU pass on the interleaved layout (dswiglu.py) runs at HBM bandwidth.

W1i (2f, h) interleaves the rows of gate and up (gate_0, up_0, gate_1, ...), the layout quack's gated
epilogue pairs; `interleave` builds it from the HF-named parameters each call (one 16 MB copy per layer), so
checkpoints and exports are unchanged. `preact` (M, 2f) is interleaved the same way.

The forward is a `torch.library` custom op with a fake and a registered autograd formula (torch code,
which torch.compile traces). bf16 / fp16 CUDA tensors on compute capability 9.0+. When quack is
missing this module still imports and `UNAVAILABLE_REASON` says why. `_kernels.gemm_gated` is the one seam
the CPU tests replace with plain math following quack's contract.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.errors import EngineError
from .. import LIBRARY, _quack
from .._hopper import require_hopper_half
from .dswiglu import dswiglu


class Kernels(NamedTuple):
    # gemm_gated(x (M, h), W1i^T (h, 2f)) -> (preact (M, 2f) = x @ W1i^T, silu(preact[:, 0::2]) * preact[:, 1::2])
    gemm_gated: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _load() -> tuple[Kernels | None, str | None]:
    if _quack.KERNELS is None:
        return None, _quack.UNAVAILABLE_REASON

    def k_gemm_gated(x: Tensor, w1it: Tensor) -> tuple[Tensor, Tensor]:
        require_hopper_half(x, "mlp=quack_gated", "unfused")
        return _quack.KERNELS.gemm_gated(x, w1it)

    return Kernels(k_gemm_gated), None


_kernels, UNAVAILABLE_REASON = _load()


@torch.library.custom_op(f"{LIBRARY}::quack_swiglu_fc1", mutates_args=())
def quack_swiglu_fc1(x: Tensor, w1i: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, h), w1i (2f, h) interleaved -> (preact (M, 2f) for the backward, silu(gate) * up (M, f))."""
    if _kernels is None:
        raise EngineError(f"ops.mlp=quack_gated: {UNAVAILABLE_REASON}")
    preact, postact = _kernels.gemm_gated(x.contiguous(), w1i.T)
    f = w1i.shape[0] // 2
    if tuple(preact.shape) != (x.shape[0], 2 * f) or tuple(postact.shape) != (x.shape[0], f):
        raise EngineError(f"quack_gated: kernel returned {tuple(preact.shape)} / {tuple(postact.shape)}, "
                          f"expected {(x.shape[0], 2 * f)} / {(x.shape[0], f)}")
    return preact, postact


@quack_swiglu_fc1.register_fake
def _(x: Tensor, w1i: Tensor) -> tuple[Tensor, Tensor]:
    M, two_f = x.shape[0], w1i.shape[0]
    return x.new_empty((M, two_f)), x.new_empty((M, two_f // 2))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    ctx.mark_non_differentiable(output[0])
    ctx.save_for_backward(*inputs, output[0])


def _backward(ctx, _dpreact: Tensor | None, dpost: Tensor) -> tuple[Tensor, Tensor]:
    x, w1i, preact = ctx.saved_tensors
    dpreact = dswiglu(preact, dpost)  # interleaved, as preact
    return dpreact @ w1i, dpreact.T @ x


quack_swiglu_fc1.register_autograd(_backward, setup_context=_setup_context)


class _Interleave(torch.autograd.Function):
    """(gate (f, h), up (f, h)) -> W1i (2f, h) = gate_0, up_0, gate_1, ...; the backward hands back contiguous
    gradients. Why: torch.stack's backward gives strided views of dW1i that autograd copies outside the compiled
    graph; made contiguous here, the copy is in the traced backward, where Inductor fuses it."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        return torch.stack((gate, up), dim=1).flatten(0, 1)

    @staticmethod
    def backward(ctx, dw1i: Tensor) -> tuple[Tensor, Tensor]:
        pairs = dw1i.view(-1, 2, dw1i.shape[-1])
        return pairs[:, 0].contiguous(), pairs[:, 1].contiguous()


def interleave(gate_w: Tensor, up_w: Tensor) -> Tensor:
    """W1i (2f, h): the rows of gate_w and up_w (f, h) interleaved, gate first (quack's gated layout)."""
    return _Interleave.apply(gate_w, up_w)


def mlp(x: Tensor, gate_w: Tensor, up_w: Tensor, down_w: Tensor) -> Tensor:
    """down(silu(x @ gate^T) * (x @ up^T)); x (..., h) -> (..., h)."""
    w1i = interleave(gate_w, up_w)  # (2f, h): gate_0, up_0, gate_1, ...
    _, postact = quack_swiglu_fc1(x.reshape(-1, x.shape[-1]), w1i)
    return F.linear(postact, down_w).view(*x.shape[:-1], down_w.shape[0])
