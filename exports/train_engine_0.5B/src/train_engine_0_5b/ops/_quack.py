"""quack's CuTeDSL GEMMs (`quack-kernels`, sm90+), for the op modules that elect them by measurement.

One loader (the package is optional: when it is missing, or the GPU predates Hopper, `UNAVAILABLE_REASON`
says why and `KERNELS` is None) and the SM90 tile configs pinned per GEMM site. Why pinned: quack's own
heuristic config (no autotuning: that took minutes on first use) ran these sites 0-35 % slower than the
best of its SM90 configs on an H100 (benchmarks/gpu/gemm_election.py; results under
benchmarks/results/engine-0.5b-gemm-election-2026-11-24-h100/). Off SM90 the heuristic config is used.

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

from train_engine_0_5b.ops._hopper import gpu_too_old

# site -> (tile_m, tile_n, pingpong, cluster_m, cluster_n), the fastest measured in two runs on H100s at the 0.5B
# step's shapes (8 x 4096 tokens; ms per call, run 1 / run 2):
#   fc2 dgrad with dSwiGLU: 0.684 (run 2) against 0.714 / 0.714 for (128, 128, pingpong, 2, 1), 0.866 / 0.860
#     for the heuristic config, 0.864 / 0.878 for cuBLAS + the Triton dSwiGLU pass;
#   output logits per 8192-token chunk: 1.672 / 1.628 against 1.640 / 1.721 for (128, 192, pingpong, 2, 1),
#     1.751 / 1.790 heuristic, 2.019 / 1.997 cuBLAS;
#   output dx per chunk: 1.678 (run 2) against 1.790 cuBLAS, 2.449 heuristic.
SM90_CONFIGS: dict[str, tuple[int, int, bool, int, int]] = {
    "mlp.fc2_dgrad_dswiglu": (128, 128, True, 1, 2),
    "output.logits": (128, 160, True, 2, 1),
    "output.dgrad": (128, 256, False, 1, 2),
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
        tm, tn, pingpong, cm, cn = SM90_CONFIGS[site]
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
        # Handed a partials buffer (rows, N-tiles), quack fills it and leaves it unfolded (it is then not in the
        # returned dict), instead of folding it with torch.logsumexp (~10 small launches per call, ~45 us on an
        # H100 at 8192 rows); under the heuristic config the tile, so the buffer's shape, is unknown: quack's
        # folded row logsumexp is then the one partial.
        cfg = config(site, a.device)
        if cfg is None:
            return lse_epi(a, b, out={"D": out}, tuned=False)["lse"][:, None]
        parts = torch.empty(a.shape[0], -(-b.shape[1] // cfg.tile_n), dtype=torch.float32, device=a.device)
        lse_epi(a, b, out={"D": out}, lse=parts, config=cfg, tuned=False)
        return parts

    return Kernels(k_gemm_gated, k_gemm_dgated, k_gemm_into, k_gemm_lse), None


KERNELS, UNAVAILABLE_REASON = _load()
