"""Runs every red-team job once per session, two at a time (this box has two cores), and hands the
reports to the tests, which only assert.

One seed for the session (FORGE_REDTEAM_SEED, default below) so the reference's answers are computed
once and shared through a reference cache; the `guess_reference` job runs without the cache and with
a fresh seed, as the forge loop runs gates. Subprocesses get OMP_NUM_THREADS=1 (tiny models; two at
a time).

A job may carry GateOptions overrides: a world size, M5's CPU speed settings, or a seed whose drawn case
shape has what the flaw needs (`seed_where`: e.g. a cosine schedule), since tiny cases take their shape
from the seed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gates.report import GateReport
from gates.runner import GateOptions, run_all, run_gate

ENGINES = Path(__file__).parent / "engines"
EXPORT = Path(__file__).resolve().parents[2] / "exports" / "train_engine_0.5B"  # the real engine, when it exists
EXPORT_PRESENT = (EXPORT / "src" / "train_engine_0_5b" / "__main__.py").is_file()
SEED = int(os.environ.get("FORGE_REDTEAM_SEED", "20261123"))


def seed_where(pred, start: int = SEED, tries: int = 1000) -> int:
    """The first seed from `start` whose drawn tiny case shape (gates/case.py draw_shape) satisfies `pred`."""
    from gates.case import draw_shape

    return next(s for s in range(start, start + tries) if pred(draw_shape(s)))


# M5's speed part on a CPU (a test-only peak of 10 GFLOP/s, so the part runs): one micro batch of 2 x 16
# tokens per step, 200 steps timed between the arrivals of the log lines of steps 5 and 205. A correct rt_base step takes ~7-10 ms on this
# box (MFU ~80-120 % of that peak, above the default 36 %); fake_speed sleeps 50 ms more per step (~15 %).
# spec_claims_48_layers is held to 300 %: beyond its real speed, within reach had the gate taken its
# claimed 48-layer model's FLOPs (~6x a drawn 3-4 layer tiny model's). Calibrated to a CPU like this one.
CPU_SPEED = dict(cpu_peak_tflops=0.01, speed_seq_length=16, speed_global_batch_size=2, speed_micro_batch_size=2,
                 speed_steps=200)

DP2 = {"world_size": 2}  # M7 jobs whose flaw does not depend on the world size: 2 processes, not the drawn 2..4

# (engine, gate[, GateOptions overrides]): each red-team engine against the gate that must reject it
# (longest first: two run at a time). A few pairs show an old gate passing a flaw only a new one catches.
JOBS: list[tuple] = [
    ("fake_speed", "m5_long_train", CPU_SPEED),
    ("spec_claims_48_layers", "m5_long_train", CPU_SPEED | {"mfu_threshold": 3.0}),
    ("bug_at_world_4", "m7_pretrain", {"world_size": 4}),
    ("bug_at_world_4", "m4_data_parallel", {"world_size": 4}),
    ("pretrain_no_dp_reduce", "m7_pretrain", DP2),
    ("bug_past_first_bucket", "m7_pretrain", DP2),
    ("pretrain_ignores_grad_clip", "m7_pretrain", DP2),
    ("pretrain_decays_norms", "m7_pretrain", DP2),
    ("pretrain_constant_lr", "m7_pretrain", DP2 | {"seed": seed_where(lambda s: s.schedule.kind != "constant")}),
    ("gate_detect", "m7_pretrain", DP2),
    ("export_folds_probe_only", "m7_pretrain", DP2),
    ("pretrain_declines", "m7_pretrain", DP2),
    ("resume_never_reloads", "m8_resume"),
    ("resume_drops_moments", "m8_resume"),
    ("resume_restarts_data", "m8_resume"),
    ("non_atomic_save", "m8_resume"),
    ("bug_cosine", "m4_data_parallel", {"seed": seed_where(lambda s: s.schedule.kind == "cosine" and s.world_size == 2)}),
    ("export_folds_probe_only", "m6_checkpoint"),
    ("bug_decay_steps_ignored", "m3_optimizer",
     {"steps": 6, "seed": seed_where(lambda s: s.schedule.kind == "wsd" and s.schedule.decay_steps == 2)}),
    ("pretrain_decays_norms", "m3_optimizer"),
    ("bug_past_seq_64", "m1_forward"),
    ("probe_declines", "m2_backward"),
    ("dp_mean_of_means", "m4_data_parallel"),
    ("lazy_ranks", "m4_data_parallel"),
    ("ignores_rope_scaling", "m1_forward", {"seed": seed_where(lambda s: s.rope_scaling is not None)}),
    ("ignores_padding_idx", "m2_backward", {"seed": seed_where(lambda s: s.pad_token_id is not None)}),
    ("drop_rng_state", "m6_checkpoint"),
    ("residual_scale", "m1_forward"),
    ("rope_theta", "m1_forward"),
    ("non_causal", "m1_forward"),
    ("nan_output", "m1_forward"),
    ("guess_reference", "m1_forward"),
    ("zero_grad", "m2_backward"),
    ("zero_grad", "m1_forward"),
    ("echo_inputs", "m2_backward"),
    ("echo_inputs", "m3_optimizer"),
    ("skip_weight_decay", "m3_optimizer"),
    ("skip_weight_decay", "m2_backward"),
]


@pytest.fixture(scope="session")
def options(tmp_path_factory) -> GateOptions:
    return GateOptions(seed=SEED, reference_cache=tmp_path_factory.mktemp("refcache"), timeout_s=600)


@pytest.fixture(scope="session")
def reports(options) -> dict[tuple[str, str], GateReport | list[GateReport]]:
    """{(engine, gate): report} for JOBS; {("base", "all"): [reports]} for the correct base engine and
    {("export", "all"): [reports]} for exports/train_engine_0.5B when it exists (same seed: it shares
    the reference cache)."""

    def job(spec: tuple):
        engine, gate, overrides = (*spec, {})[:3]
        key = (engine, gate)
        if engine in ("base", "export"):
            return key, run_all(ENGINES / "base" if engine == "base" else EXPORT, options)
        opts = options.model_copy(update=overrides)
        if engine == "guess_reference":
            opts = options.model_copy(update={"seed": None, "reference_cache": None})
        return key, run_gate(gate, ENGINES / engine, opts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        with ThreadPoolExecutor(2) as pool:
            first = [("base", "all")] + ([("export", "all")] if EXPORT_PRESENT else [])
            return dict(pool.map(job, [*first, *JOBS]))
