"""The one thing a red-team engine gets wrong. All off: a correct engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flaws:
    # --- probe-visible (the stage-1 gates M1-M6 catch these) ---
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

    # --- the training path: `pretrain` only, every probe stays correct ---
    pretrain_ignores_grad_clip: bool = False  # pretrain never clips (the logged grad_norm stays right)
    pretrain_decays_norms: bool = False  # pretrain applies weight decay to the norm weights too
    pretrain_no_dp_reduce: bool = False  # pretrain never sums gradients across ranks
    pretrain_constant_lr: bool = False  # pretrain ignores the schedule: lr every step (and logs it)
    pretrain_declines: bool = False  # pretrain exits 77
    gate_detect: bool = False  # pretrain is correct only under a cwd containing "forge-engine-"; else 2x lr (logs the nominal lr)

    # --- resume / checkpoint (pretrain checkpoints; probe checkpoints stay correct) ---
    resume_never_reloads: bool = False  # --resume keeps the initial weights and fresh moments, takes only the step
    resume_drops_moments: bool = False  # pretrain checkpoints carry zeroed AdamW moments
    resume_restarts_data: bool = False  # after --resume the batches restart at batch 0
    non_atomic_save: bool = False  # pretrain saves in place, `latest` first, slowly (a kill leaves a broken one)
    export_folds_probe_only: bool = False  # export-hf folds the MiniCPM scales only for probe checkpoints

    # --- speed claims ---
    fake_speed: bool = False  # bench claims absurd tokens/s, the log claims 52 % MFU; pretrain sleeps 50 ms a step

    # --- wider cases (probe and pretrain) ---
    rope_wrap: int | None = None  # RoPE positions wrap modulo this
    drop_last_rank_at_world: int | None = None  # with this many ranks, the last rank's gradient is dropped
    cosine_to_zero: bool = False  # the cosine schedule decays to 0, not min_lr
    wsd_ignores_decay_steps: bool = False  # wsd always decays over ceil(10 % of steps)
    reduce_first_bucket_only: bool = False  # pretrain DP: only the first gradient bucket is all-reduced
    ignores_rope_scaling: bool = False  # plain RoPE whatever the config's rope_scaling (LongRoPE) says
    ignores_padding_idx: bool = False  # the pad token's embedding row gets its lookup gradient
    lazy_ranks: bool = False  # rank 0 computes every rank's rows, the others add zero gradients (the sum is right)

    # --- verdicts ---
    declines_probe: str | None = None  # exits 77 on this probe
