"""The gates drive a tensor-parallel engine (GateOptions.tp: every engine command's data-parallel rank is tp
processes with `--tp`): train_engine_8b on the reduced 8B preset at TP=2 over gloo, on a CPU (slow: each gate
runs 1-6 engine commands of 2-4 processes, 10-80 s; M3 ~50 s, M4 ~90 s, M7 ~140 s on the shared 2-core box).

Every gate runs at the default float32 policy, no bound raised. M1 forward, M2 backward, M6 checkpoint
(bit-identical resume, HF export) and M8 resume (bitwise, incl. SIGKILL during a DCP save) pass.
M3, M4 and M7 pass under the float64-twin rule for grad norms (gates/policies.py): the reference's fp32 norm of
this preset's gradients (1M-element embedding and lm_head) is itself 6.5-7.0e-5 below the exact norm of the
same gradients, which its steps answer now carries (`grad_norms_exact`, accumulated in float64); the engine,
which sums two half-size norms at TP=2, is 1.4-3.0e-5 off that exact norm (2.4-4.1e-5 off the reference's
fp32 one, over the fixed 2e-5), against a bound of 2 x the reference's own error + 2e-5 = 1.50-1.60e-4
(measured on MARGIN_SEED; the reports record each step's figures, the reference's error and the bound).
tests/gates/test_grad_norm_twin.py shows the rule still failing a norm x1.001 or one missing a TP shard's
squares. M7's hf_export compares transformers at the engine's final weights with the reference's forward at
those same weights (the DP=1 run's dump-state), so it sees the export alone: it used to take the reference's
trained weights, where an embedding element AdamW moved differently on a near-zero gradient showed in
hidden_states.0 above the 1e-4 max_rel bound (1 of 5 fresh seeds, 4.7e-4); now hidden_states.0 is exact
(0.0) and the logits 3e-7. They still run on one fixed seed (a slow test must be reproducible), now with no
margin override.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gates.options import GateOptions
from gates.runner import run_gate

ENGINE = Path(__file__).resolve().parents[2] / "exports" / "train_engine_8b"
MARGIN_SEED = 617814279  # the seed M3/M4/M7 were measured on (module doc)


def _options(**kw) -> GateOptions:
    return GateOptions(case="minicpm4-8b-reduced", tp=2, world_size=2, sandbox="preferred", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["m1_forward", "m2_backward", "m6_checkpoint", "m8_resume"])
def test_gate_passes_at_tp2(gate):
    report = run_gate(gate, ENGINE, _options())
    assert report.verdict == "passed", report.message


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["m3_optimizer", "m4_data_parallel", "m7_pretrain"])
def test_gate_passes_at_tp2_at_the_default_bounds(gate):
    report = run_gate(gate, ENGINE, _options(seed=MARGIN_SEED))
    assert report.verdict == "passed", report.message
    assert report.policy["twin_ratio"] is not None and report.policy["rel"] == 2e-5  # no override
    norms = [d for d in report.tensors if "grad_norms[" in d.name]
    assert norms and all(d.ref_rel is not None and d.bound_rel > d.rel for d in norms)
