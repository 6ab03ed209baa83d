"""The training path: red-team engines whose probes are right but whose `pretrain`, resume, checkpoints,
export or speed claims are wrong, and engines whose bug only shows on wider cases (seq > 64, 4 ranks, a
cosine or an explicit-decay schedule, several gradient buckets) or in a verdict (exit 77). Each must be
`failed` by the gate named in conftest.py's JOBS, at the right part and place. Reports come from
conftest.py; tests/redteam/README.md has the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gates.case import draw_shape
from gates.model_config import from_toml, preset
from gates.report import GateReport

ENGINES = Path(__file__).parent / "engines"
pytestmark = pytest.mark.slow


def parts(r: GateReport) -> dict[str, str]:
    return {p.name: p.verdict for p in r.parts}


def part(r: GateReport, name: str):
    return next(p for p in r.parts if p.name == name)


def bad(r: GateReport, prefix: str = "") -> list[str]:
    return [d.name for d in r.tensors if not d.ok and d.name.startswith(prefix)]


def caught(r: GateReport, gate: str) -> None:
    assert r.gate == gate and r.verdict == "failed", (r.verdict, r.message, r.error_type)


# ----- the correct engine passes the new gates --------------------------------------------------------
def test_base_engine_passes_pretrain_and_resume(reports):
    base = {r.gate: r for r in reports[("base", "all")]}
    m7, m8 = base["m7_pretrain"], base["m8_resume"]
    assert m7.verdict == "passed" and parts(m7) == {"dp1": "passed", "dpN": "passed", "hf_export": "passed"}, m7.message
    assert m8.verdict == "passed", m8.message
    assert parts(m8) == {"resume": "passed", "data_position": "passed", "kill_during_save": "passed"}
    assert "killed after step" in part(m8, "kill_during_save").message
    runs = [c.argv for c in m8.commands if "pretrain" in c.argv]  # bitwise needs run-to-run determinism
    assert len(runs) == 5 and all("--deterministic" in a for a in runs)
    log = json.loads(m7.artifacts["engine log (last line, its own figures)"])
    assert log["grad_buckets"] > 1, "the gate's --bucket-mb must split the gradients into several buckets"
    m5 = base["m5_long_train"]  # no CPU peak given: the speed part cannot be measured
    assert parts(m5) == {"loss": "passed", "mfu": "unsupported"}


# ----- 1. the training path (every probe right, pretrain wrong) ---------------------------------------
def test_pretrain_without_clipping_diverges_after_step_0(reports):
    r = reports[("pretrain_ignores_grad_clip", "m7_pretrain")]
    caught(r, "m7_pretrain")
    assert parts(r)["dp1"] == "failed" and parts(r)["dpN"] == "failed"
    assert r.localization.what.startswith("pretrain DP=1 vs reference")
    # step 0's loss and grad norm (before clipping) are right; the unclipped update shows afterwards
    assert not [n for n in bad(r, "dp1:") if n.endswith("[0]")]
    assert r.localization.step is None or r.localization.step >= 1


def test_pretrain_decaying_norm_weights_names_a_norm(reports):
    assert reports[("pretrain_decays_norms", "m3_optimizer")].verdict == "passed"  # the probes are right
    r = reports[("pretrain_decays_norms", "m7_pretrain")]
    caught(r, "m7_pretrain")
    assert parts(r)["dp1"] == "failed"
    weights = bad(r, "dp1:weight.")
    assert any(n.endswith("norm.weight") for n in weights), weights  # the decayed norms are among what is out


@pytest.mark.parametrize("engine", ["pretrain_no_dp_reduce", "bug_past_first_bucket"])
def test_missing_gradient_all_reduce_fails_dpN_at_step_0(reports, engine):
    r = reports[(engine, "m7_pretrain")]
    caught(r, "m7_pretrain")
    assert parts(r) == {"dp1": "passed", "dpN": "failed", "hf_export": "passed"}
    n = r.case["world_size"]
    assert r.localization.step == 0 and r.localization.what.startswith(f"pretrain DP={n} vs reference: step 0")
    assert "dpN:grad_norms[0]" in bad(r)
    assert "dpN:losses[0]" not in bad(r), "the loss of step 0 is right: only the gradients are not summed"


def test_pretrain_ignoring_the_schedule_fails_on_lrs(reports):
    r = reports[("pretrain_constant_lr", "m7_pretrain")]
    caught(r, "m7_pretrain")
    lrs = [n for n in bad(r, "dp1:lrs[")]
    assert lrs, bad(r)
    assert "lrs[" in r.localization.what and r.localization.step == int(lrs[0].split("[")[1][:-1])


def test_pretrain_declining_is_failed_not_unsupported(reports):
    r = reports[("pretrain_declines", "m7_pretrain")]
    caught(r, "m7_pretrain")
    assert parts(r) == {"dp1": "failed", "dpN": "failed", "hf_export": "failed"}
    assert "exit 77" in part(r, "dp1").message and "exit 77" in r.localization.what


def test_engine_that_detects_the_old_sandbox_is_caught_outside_it(reports):
    r = reports[("gate_detect", "m7_pretrain")]
    caught(r, "m7_pretrain")
    runs = [c for c in r.commands if c.role.startswith("engine pretrain")]
    assert runs and all("forge-engine-" not in c.cwd for c in runs), [c.cwd for c in runs]
    # it logs the nominal lr: the 2x lr shows in step 1's loss / grad norm, never in `lrs`
    assert r.localization.step == 1 and not bad(r, "dp1:lrs")


# ----- 3. resume and checkpoints ---------------------------------------------------------------------
def k_of(r: GateReport) -> int:
    return r.case["steps"] // 2


def first_bad_step(r: GateReport, prefix: str) -> int:
    return min(int(n.split("[")[1][:-1]) for n in bad(r, prefix) if "[" in n)


def test_resume_that_never_reloads_differs_at_the_first_step_after_it(reports):
    r = reports[("resume_never_reloads", "m8_resume")]
    caught(r, "m8_resume")
    assert parts(r) == {"resume": "failed", "data_position": "passed", "kill_during_save": "failed"}
    assert first_bad_step(r, "resume:") == k_of(r), "step k+1's loss already uses the (initial) weights"


def test_checkpoint_without_moments_differs_after_the_first_resumed_update(reports):
    r = reports[("resume_drops_moments", "m8_resume")]
    caught(r, "m8_resume")
    assert parts(r)["resume"] == "failed" and parts(r)["data_position"] == "passed"
    assert first_bad_step(r, "resume:") == k_of(r) + 1
    assert r.localization.what.startswith("resume vs uninterrupted (bitwise)")


def test_resume_that_restarts_the_data_fails_data_position(reports):
    r = reports[("resume_restarts_data", "m8_resume")]
    caught(r, "m8_resume")
    assert parts(r)["data_position"] == "failed"
    k = k_of(r)
    msg = part(r, "data_position").message
    assert f"step {k + 1} logged" in msg and "batch 1's count" in msg and "replayed or skipped" in msg
    assert r.localization.what.startswith(f"data position after the resume at step {k}")


def test_non_atomic_save_killed_mid_save_cannot_resume(reports):
    r = reports[("non_atomic_save", "m8_resume")]
    caught(r, "m8_resume")
    assert parts(r) == {"resume": "passed", "data_position": "passed", "kill_during_save": "failed"}
    msg = part(r, "kill_during_save").message
    assert "killed after step" in msg and "the resume failed" in msg and "incomplete" in msg


def test_export_of_pretrain_checkpoints_must_fold_the_scales(reports):
    m6 = reports[("export_folds_probe_only", "m6_checkpoint")]
    assert m6.verdict == "passed"  # the probe checkpoint's export is right: the old gate passes it
    r = reports[("export_folds_probe_only", "m7_pretrain")]
    caught(r, "m7_pretrain")
    assert parts(r) == {"dp1": "passed", "dpN": "passed", "hf_export": "failed"}
    assert r.localization.tensor == "hidden_states.0", r.localization.what  # the embedding scale is not folded
    assert r.localization.what.startswith("HF export of pretrain's final checkpoint")


# ----- 4. speed: the gate's clock and the case's FLOPs ------------------------------------------------
def test_fake_speed_claims_are_ignored(reports):
    r = reports[("fake_speed", "m5_long_train")]
    caught(r, "m5_long_train")
    p = part(r, "mfu")
    assert p.verdict == "failed" and "on the gate's clock" in p.message
    n = p.numbers
    assert not any(c.role.startswith("engine bench") for c in r.commands), "bench's figures are never read"
    assert '"mfu": 0.52' in n["engine_log_last_line"]  # its claim, recorded beside the gate's figure
    assert n["mfu"] < n["threshold"] and n["step_time_s"] >= 0.04, n  # the 50 ms sleep shows on the gate's clock
    honest = part(reports[("spec_claims_48_layers", "m5_long_train")], "mfu").numbers  # rt_base's speed, same settings
    assert n["step_time_s"] > honest["step_time_s"], (n["step_time_s"], honest["step_time_s"])


def test_flops_come_from_the_case_not_the_engines_model_spec(reports):
    r = reports[("spec_claims_48_layers", "m5_long_train")]
    caught(r, "m5_long_train")
    p = part(r, "mfu")
    assert p.verdict == "failed" and parts(r)["loss"] == "passed"
    shape = draw_shape(r.case["seed"])
    case_model, claimed = shape.model("tiny"), from_toml(ENGINES / "spec_claims_48_layers" / "model_spec.toml")
    seq = p.numbers["seq_length"]
    assert claimed.num_layers == 48 and case_model.num_layers == r.case["num_layers"] < 48
    assert p.numbers["flops_per_token"] == case_model.flops_per_token(seq) != claimed.flops_per_token(seq)
    assert "the case's model" in p.numbers["flops_source"]
    assert preset("tiny").num_layers != 48


# ----- 5. wider cases ----------------------------------------------------------------------------------
def test_rope_wrapping_at_64_is_caught_on_longer_sequences(reports):
    r = reports[("bug_past_seq_64", "m1_forward")]
    caught(r, "m1_forward")
    assert r.case["seq_length"] > 64
    assert (r.localization.layer, r.localization.tensor) == (0, "hidden_states.1"), r.localization.what


def test_dropped_rank_at_world_4(reports):
    m4 = reports[("bug_at_world_4", "m4_data_parallel")]
    caught(m4, "m4_data_parallel")
    assert m4.case["world_size"] == 4 and parts(m4) == {"vs_dp1": "failed", "vs_reference": "failed", "ranks": "failed"}
    assert m4.localization.step == 0 and m4.localization.what.startswith("DP=4 vs DP=1")
    m7 = reports[("bug_at_world_4", "m7_pretrain")]
    caught(m7, "m7_pretrain")
    assert m7.case["world_size"] == 4 and parts(m7) == {"dp1": "passed", "dpN": "failed", "hf_export": "passed"}
    assert m7.localization.step == 0 and m7.localization.what.startswith("pretrain DP=4 vs reference: step 0")


def test_cosine_to_zero_fails_on_lrs(reports):
    r = reports[("bug_cosine", "m4_data_parallel")]
    caught(r, "m4_data_parallel")
    assert r.case["schedule"]["kind"] == "cosine"
    assert parts(r) == {"vs_dp1": "passed", "vs_reference": "failed", "ranks": "failed"}  # DP=N and DP=1 share the bug
    assert r.localization.what.startswith("DP=") and "vs reference" in r.localization.what
    assert "lrs[" in r.localization.what


def test_ignored_decay_steps_fails_on_lrs_in_the_decay(reports):
    r = reports[("bug_decay_steps_ignored", "m3_optimizer")]
    caught(r, "m3_optimizer")
    sched, steps = r.case["schedule"], r.case["steps"]
    assert sched["kind"] == "wsd" and sched["decay_steps"] == 2 and steps == 6
    # explicit decay over 2 steps starts at step 5 (index 4); the default ceil(10 %) = 1 step would start at 6
    assert bad(r, "lrs[")[0] == "lrs[4]" and r.localization.step == 4


# ----- 6. verdicts -------------------------------------------------------------------------------------
def test_declining_a_probe_is_failed(reports):
    r = reports[("probe_declines", "m2_backward")]
    caught(r, "m2_backward")
    assert "exit 77" in r.message
