"""The SwiGLU MLP on quack's CuTeDSL GEMMs with the activation in their epilogues (`quack-kernels`, sm90+).

Why: the compiled reference step spent 17 of its 233 ms (MiniCPM4-0.5B, 8 x 4096 tokens, one H100) in
two standalone SwiGLU kernels (forward 6.3 ms, backward 11.0 ms), both already at HBM bandwidth
(benchmarks/results/2026-11-23-h100-minicpm4-0.5b-engine-optable.json): only moving the activation into
the GEMMs beside it removes that traffic.

    forward   preact, postact = gemm_gated(x, W1^T)            silu(gate) * up in the fc1 epilogue
              out = postact @ W2^T
    backward  dpreact, postact = gemm_dgated(dout, W2, preact)  dout @ W2, then dSwiGLU in the epilogue
              dW2 = dout^T @ postact;  dx = dpreact @ W1;  dW1 = dpreact^T @ x

W1 = cat([gate, up]) (2f, h) in quack's concat layout (`concat_layout`), so the parameters keep their HF
names and shapes: the cat is one 16 MB copy per layer and micro batch, its gradient two views. `preact`
(M, 2f) is in quack's interleaved layout (gate_0, up_0, gate_1, ...) and only quack reads it.

Forward and backward are two `torch.library` custom ops with fakes and a registered autograd formula (as
attention/flash4.py), so torch.compile sees one opaque node per direction and quack runs eagerly inside.
bf16 / fp16 CUDA tensors on compute capability 9.0+. When quack is missing this module still imports and
`UNAVAILABLE_REASON` says why. `_kernels` (quack's gemm, gemm_gated, gemm_dgated with the arguments used
here) is the one seam the CPU tests replace with plain math following quack's contract.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from train_engine_0_5b.errors import EngineError

# quack's autotuner (every config compiled and timed on first use of a shape) against its heuristic
# config: set from the measurement in scripts/gpu_mlp.py; False keeps the first step short.
TUNED = False


class Kernels(NamedTuple):
    # gemm(A (M, K), B (K, N), concat_layout) -> (M, N); ("B",): B's non-contiguous dim is [gate; up],
    # read as interleaved; ("out",): the interleaved output rows are written as [gate; up]
    gemm: Callable[[Tensor, Tensor, tuple[str, ...] | None], Tensor]
    # gemm_gated(x (M, h), W1^T (h, 2f) concat) -> (preact (M, 2f) interleaved, silu(gate) * up (M, f))
    gemm_gated: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    # gemm_dgated(dout (M, h), W2 (h, f), preact) -> (dpreact (M, 2f) interleaved, postact (M, f))
    gemm_dgated: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _check(x: Tensor) -> None:
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        raise EngineError(f"ops.mlp=quack_gated needs bf16/fp16 CUDA tensors, got {x.dtype} on {x.device.type}")
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        raise EngineError("ops.mlp=quack_gated needs compute capability >= 9.0 (H100 or newer); use unfused")


def _load() -> tuple[Kernels | None, str | None]:
    try:
        from quack.gemm_interface import gemm, gemm_dgated, gemm_gated
    except Exception as e:  # noqa: BLE001 - missing package, or CuTeDSL / CUDA libraries it cannot load
        return None, f"quack-kernels is not importable ({type(e).__name__}: {str(e)[:200]})"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0):
        return None, f"quack's gated GEMMs need compute capability >= 9.0; this GPU has {torch.cuda.get_device_capability()}"

    def k_gemm(a: Tensor, b: Tensor, concat_layout: tuple[str, ...] | None = None) -> Tensor:
        return gemm(a, b, concat_layout=concat_layout, dynamic_scheduler=True, tuned=TUNED)

    def k_gemm_gated(x: Tensor, w1t: Tensor) -> tuple[Tensor, Tensor]:
        _check(x)
        return gemm_gated(x, w1t, activation="swiglu", concat_layout=("B",), tuned=TUNED)

    def k_gemm_dgated(dout: Tensor, w2: Tensor, preact: Tensor) -> tuple[Tensor, Tensor]:
        dpreact, postact = gemm_dgated(dout, w2, preact, activation="swiglu", dynamic_scheduler=True, tuned=TUNED)
        return dpreact, postact

    return Kernels(k_gemm, k_gemm_gated, k_gemm_dgated), None


_kernels, UNAVAILABLE_REASON = _load()


def _require() -> Kernels:
    if _kernels is None:
        raise EngineError(f"ops.mlp=quack_gated: {UNAVAILABLE_REASON}")
    return _kernels


@torch.library.custom_op("train_engine_0_5b::quack_mlp_fwd", mutates_args=())
def quack_mlp_fwd(x: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, h), w1 = cat([gate, up]) (2f, h), w2 (h, f) -> (out (M, h), preact (M, 2f) for the backward)."""
    k = _require()
    preact, postact = k.gemm_gated(x.contiguous(), w1.T)
    return k.gemm(postact, w2.T, None), preact


@quack_mlp_fwd.register_fake
def _(x: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty((x.shape[0], w1.shape[0]))


@torch.library.custom_op("train_engine_0_5b::quack_mlp_bwd", mutates_args=())
def quack_mlp_bwd(dout: Tensor, x: Tensor, w1: Tensor, w2: Tensor, preact: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx (M, h), dw1 (2f, h) as [d gate; d up], dw2 (h, f))."""
    k = _require()
    dout, x = dout.contiguous(), x.contiguous()
    dpreact, postact = k.gemm_dgated(dout, w2, preact)
    dw2 = k.gemm(dout.T, postact, None)
    dx = k.gemm(dpreact, w1, ("B",))
    dw1 = k.gemm(dpreact.T, x, ("out",))
    return dx, dw1, dw2


@quack_mlp_bwd.register_fake
def _(dout: Tensor, x: Tensor, w1: Tensor, w2: Tensor, preact: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, w1, w2 = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, w1, w2, output[1])


def _backward(ctx, dout: Tensor, _dpreact: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    x, w1, w2, preact = ctx.saved_tensors
    return quack_mlp_bwd(dout, x, w1, w2, preact)


quack_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def mlp(x: Tensor, gate_w: Tensor, up_w: Tensor, down_w: Tensor) -> Tensor:
    """down(silu(x @ gate^T) * (x @ up^T)); x (..., h) -> (..., h)."""
    w1 = torch.cat((gate_w, up_w))  # quack's concat [gate; up] layout
    out, _ = quack_mlp_fwd(x.reshape(-1, x.shape[-1]), w1, down_w)
    return out.view(*x.shape[:-1], out.shape[-1])
