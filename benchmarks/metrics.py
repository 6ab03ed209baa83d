"""The arithmetic every benchmark shares: median step time, tokens/s, MFU (docs/DESIGN.md's formula), ratios.

MFU = flops_per_token * tokens_per_s / (gpus * peak), with `MiniCPMConfig.flops_per_token` (Megatron-LM
v0.15's count, causal attention halved, true vocab) and the dense bf16 peak of one H100/H200 SXM.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from gates.model_config import MiniCPMConfig

PEAK_TFLOPS_BF16 = 989.4  # dense bf16 TFLOP/s per H100 / H200 SXM GPU (docs/DESIGN.md)
GIB = 2**30


def median(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("median of no values")
    return float(statistics.median(xs))


def mfu(tokens_per_s: float, flops_per_token: float, gpus: int = 1, peak_tflops: float = PEAK_TFLOPS_BF16) -> float:
    """Model FLOPs utilization as a fraction (0.44 = 44 %)."""
    return flops_per_token * tokens_per_s / (gpus * peak_tflops * 1e12)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero (a stack that did not run has no ratio)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize(step_times_s: Sequence[float], warmup: int, tokens_per_step: int, cfg: MiniCPMConfig,
              seq_length: int, gpus: int = 1) -> dict[str, float | int]:
    """From every step's wall time (warm-up first): the median over the measured steps, tokens/s and MFU."""
    measured = list(step_times_s[warmup:])
    if not measured:
        raise ValueError(f"no measured steps: {len(step_times_s)} steps with {warmup} warm-up")
    step = median(measured)
    tps = tokens_per_step / step
    return {
        "step_time_s": step,
        "tokens_per_s": tps,
        "mfu": mfu(tps, cfg.flops_per_token(seq_length), gpus),
        "measured_steps": len(measured),
    }
