"""quack's CuTeDSL GEMMs (`quack-kernels`, sm90+), for the op modules that elect them by measurement.

One loader (the package is optional: when it is missing, or the GPU predates Hopper, `UNAVAILABLE_REASON`
says why and `KERNELS` is None) and the SM90 tile config of each GEMM site, a tunable of its op (ops/table.py):
quack's heuristic config was slower at these sites and its autotuner takes minutes. Off SM90 the heuristic runs.

    KERNELS.gemm_gated(x, w1it)                 -> (preact, silu(preact[:, 0::2]) * preact[:, 1::2])
    KERNELS.gemm_dgated(dout, w2, preact, site) -> (dpreact, postact), dSwiGLU in the dgrad's epilogue
    KERNELS.gemm_into(a, b, out, site)          -> out = a @ b
    KERNELS.gemm_lse(a, b, out, site)           -> out = a @ b, and per row the logsumexps (fp32, from the fp32
                                                   accumulator) of its N-tiles (rows, n_tiles): the epilogue's
                                                   partials, whose logsumexp is the row's (the caller folds them)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import space
from ._hopper import gpu_too_old

# site -> (op, implementation, parameter) of its SM90 tile config (tile_m, tile_n, pingpong, cluster_m, cluster_n)
SM90_TILES: dict[str, tuple[str, str, str]] = {
    "mlp.fc2_dgrad_dswiglu": ("mlp", "quack_dgated", "fc2_dgrad_tile"),
    "output.logits": ("linear_cross_entropy", "quack_triton", "logits_tile"),
    "output.dgrad": ("linear_cross_entropy", "quack_triton", "dgrad_tile"),
}


class Kernels(NamedTuple):
    gemm_gated: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    gemm_dgated: Callable[[Tensor, Tensor, Tensor, str], tuple[Tensor, Tensor]]
    gemm_into: Callable[[Tensor, Tensor, Tensor, str], Tensor]
    gemm_lse: Callable[[Tensor, Tensor, Tensor, str], Tensor]


def _load() -> tuple[Kernels | None, str | None]:
    try:
        from quack.gemm_config import GemmConfig
        from quack.epilogue.library import lse_epi
        from quack.gemm_interface import gemm_dact, gemm_gated, gemm_tuned
    except Exception as e:  # noqa: BLE001 - missing package, or CuTeDSL / CUDA libraries it cannot load
        return None, f"quack-kernels is not importable ({type(e).__name__}: {str(e)[:200]})"
    if reason := gpu_too_old("quack's GEMMs"):
        return None, reason

    def config(site: str, device: torch.device) -> GemmConfig | None:
        if torch.cuda.get_device_capability(device) != (9, 0):
            return None  # quack's heuristic
        tm, tn, pingpong, cm, cn = space.value(*SM90_TILES[site])
        return GemmConfig(tile_m=tm, tile_n=tn, pingpong=pingpong, cluster_m=cm, cluster_n=cn, swap_ab=False,
                          device_capacity=9, is_dynamic_persistent=False, use_tma_gather=False)

    def k_gemm_gated(x: Tensor, w1it: Tensor) -> tuple[Tensor, Tensor]:
        # heuristic config: the autotuner's was under 1 % faster here and took 212 s to find on first use
        return gemm_gated(x, w1it, activation="swiglu", tuned=False)

    def k_gemm_dgated(dout: Tensor, w2: Tensor, preact: Tensor, site: str) -> tuple[Tensor, Tensor]:
        return gemm_dact(dout, w2, preact, activation="swiglu", tuned=False, config=config(site, dout.device))

    def k_gemm_into(a: Tensor, b: Tensor, out: Tensor, site: str) -> Tensor:
        cfg = config(site, a.device)
        if cfg is None:
            from quack.gemm_interface import gemm
            return gemm(a, b, out=out, tuned=False)
        gemm_tuned.fn(a, b, out, config=cfg)  # quack 0.6.5's `gemm` takes no config; its autotuned entry's own
        return out                            # function (what `gemm(tuned=False)` calls) does

    def k_gemm_lse(a: Tensor, b: Tensor, out: Tensor, site: str) -> Tensor:
        # Handed a partials buffer (rows, N-tiles), quack fills it unfolded (one Triton fold beats its ~10 small
        # launches); under the heuristic config the tile, so the buffer's shape, is unknown: quack's folded row
        # logsumexp is then the one partial.
        cfg = config(site, a.device)
        if cfg is None:
            return lse_epi(a, b, out={"D": out}, tuned=False)["lse"][:, None]
        parts = torch.empty(a.shape[0], -(-b.shape[1] // cfg.tile_n), dtype=torch.float32, device=a.device)
        lse_epi(a, b, out={"D": out}, lse=parts, config=cfg, tuned=False)
        return parts

    return Kernels(k_gemm_gated, k_gemm_dgated, k_gemm_into, k_gemm_lse), None


KERNELS, UNAVAILABLE_REASON = _load()
