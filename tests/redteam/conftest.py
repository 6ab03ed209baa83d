"""Runs every red-team job once per session, two at a time (this box has two cores), and hands the
reports to the tests, which only assert.

One seed for the session (FORGE_REDTEAM_SEED, default below) so the reference's answers are computed
once and shared through a reference cache; the `guess_reference` job runs without the cache and with
a fresh seed, as the forge loop runs gates. Subprocesses get OMP_NUM_THREADS=1 (tiny models; two at
a time).
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

# (engine, gate): each red-team engine against the gate that must reject it.
JOBS: list[tuple[str, str]] = [
    ("dp_mean_of_means", "m4_data_parallel"),
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

    def job(key: tuple[str, str]):
        engine, gate = key
        if engine in ("base", "export"):
            return key, run_all(ENGINES / "base" if engine == "base" else EXPORT, options)
        opts = options
        if engine == "guess_reference":
            opts = options.model_copy(update={"seed": None, "reference_cache": None})
        return key, run_gate(gate, ENGINES / engine, opts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        with ThreadPoolExecutor(2) as pool:
            first = [("base", "all")] + ([("export", "all")] if EXPORT_PRESENT else [])
            return dict(pool.map(job, [*first, *JOBS]))
