"""The one thing a red-team engine gets wrong. All off: a correct engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flaws:
    residual_scale_layer: int | None = None  # this layer uses scale_depth / L instead of scale_depth / sqrt(L)
    rope_theta: float | None = None  # RoPE with this theta instead of the config's
    non_causal: bool = False  # attention sees the future
    zero_grad: str | None = None  # this parameter's gradient is zeroed
    dp_mean_of_means: bool = False  # DP loss = mean of per-rank token means (not the global token mean)
    skip_weight_decay: str | None = None  # this matrix is put in the no-decay group
    drop_rng_state: bool = False  # checkpoints omit the RNG state; resume reseeds it
    guess_reference: bool = False  # looks for reference outputs on disk instead of computing
    echo_inputs: bool = False  # returns inputs as outputs (grads = weights, final weights = initial ones)
    nan_layer: int | None = None  # this layer's output becomes NaN
