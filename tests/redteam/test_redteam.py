"""Every red-team engine fails the gate meant to catch it, at the right place; the correct base engine
passes every gate (so the gates are not just failing everything). Reports come from conftest.py."""

from __future__ import annotations

import pytest

from gates.runner import GATES
from gates.report import GateReport

pytestmark = pytest.mark.slow


def failed_tensors(r: GateReport) -> list[str]:
    return [d.name for d in r.tensors if not d.ok]


def test_base_engine_passes_every_gate_it_can_run_on_cpu(reports):
    base = reports[("base", "all")]
    verdicts = {r.gate: r.verdict for r in base}
    assert list(verdicts) == list(GATES), "run_all must not stop: nothing failed"
    expected = {g: "passed" for g in GATES} | {"m5_long_train": "unsupported"}
    assert verdicts == expected, {r.gate: r.message for r in base}
    m5 = next(r for r in base if r.gate == "m5_long_train")
    parts = {p.name: p for p in m5.parts}
    assert parts["loss"].verdict == "passed" and parts["loss"].numbers["window_mean_rel_diff"] < 1e-3
    assert parts["mfu"].verdict == "unsupported" and "GPU only" in parts["mfu"].message
    for r in base:  # the engine always ran before the reference (no reference output exists while it runs)
        roles = [c.role.split()[0] for c in r.commands]
        if "reference" in roles and r.gate != "m5_long_train":
            assert roles.index("reference") > max(i for i, x in enumerate(roles) if x == "engine"), roles
        assert r.case["seed"] is not None and len(r.case["hash"]) == 64
        shape = r.case["shape"]  # the tiny case's shape, drawn from the seed (gates/case.py draw_shape)
        assert shape["drawn"] and shape["seed"] == r.case["seed"], shape
        if shape["applied"]:
            got = {k: r.case[k] for k in ("num_layers", "vocab_size", "tie_word_embeddings")}
            assert got == {k: shape[k] for k in got} and 3 <= got["num_layers"] <= 4


@pytest.mark.parametrize("engine, layer, tensor", [
    ("residual_scale", 1, "hidden_states.2"),
    ("rope_theta", 0, "hidden_states.1"),
    ("non_causal", 0, "hidden_states.1"),
])
def test_forward_bugs_are_localized_to_their_layer(reports, engine, layer, tensor):
    r = reports[(engine, "m1_forward")]
    assert r.verdict == "failed"
    loc = r.localization
    assert (loc.layer, loc.tensor) == (layer, tensor), loc.what
    assert loc.rel > r.policy["rel"] and loc.max_rel is not None
    earlier = [d for d in r.tensors if d.name.startswith("hidden_states.") and int(d.name.split(".")[1]) <= layer]
    assert all(d.ok for d in earlier), "layers before the bug must be within bounds"


def test_nan_output_is_caught_at_the_first_nan_layer(reports):
    r = reports[("nan_output", "m1_forward")]
    assert r.verdict == "failed"
    assert (r.localization.tensor, r.localization.layer) == ("hidden_states.2", 1)
    assert "NaN" in r.localization.what


def test_guessing_reference_paths_finds_nothing_and_fails(reports):
    r = reports[("guess_reference", "m1_forward")]
    assert r.verdict == "failed"
    # Nothing of this case existed to copy: it wrote zeros, or a stale output of another case (another
    # seed or shape), wrong from the embedding on (values, or the shape check).
    assert r.localization.tensor == "hidden_states.0"
    assert "guess:" in r.artifacts.get("engine probe forward stderr", "")
    roles = [c.role for c in r.commands]
    assert roles[0] == "engine probe forward" and all(x.startswith("reference") for x in roles[1:])


def test_zeroed_gradient_names_the_parameter(reports):
    assert reports[("zero_grad", "m1_forward")].verdict == "passed"  # the forward is right
    assert reports[("zero_grad", "m1_forward")].engine_metrics["engine probe forward"]["probe"] == "forward"
    r = reports[("zero_grad", "m2_backward")]
    assert r.verdict == "failed"
    assert r.localization.tensor == "grad.model.layers.1.self_attn.k_proj.weight"
    assert r.localization.layer == 1 and r.localization.rel == pytest.approx(1.0)
    assert failed_tensors(r) == ["grad.model.layers.1.self_attn.k_proj.weight"]


def test_echoed_inputs_are_rejected_as_copies(reports):
    r2 = reports[("echo_inputs", "m2_backward")]
    assert r2.verdict == "failed" and "exact copy" in r2.localization.what
    assert r2.localization.tensor == "grad.model.embed_tokens.weight"
    r3 = reports[("echo_inputs", "m3_optimizer")]
    assert r3.verdict == "failed" and "although lr > 0" in r3.localization.what
    assert r3.localization.tensor == "weight.model.embed_tokens.weight"
    assert not r2.tensors and not r3.tensors, "contract violations stop the gate before any comparison"


def test_skipped_weight_decay_names_the_tensor(reports):
    assert reports[("skip_weight_decay", "m2_backward")].verdict == "passed"  # gradients are right
    r = reports[("skip_weight_decay", "m3_optimizer")]
    assert r.verdict == "failed"
    assert r.localization.tensor == "weight.model.layers.0.mlp.up_proj.weight"
    assert failed_tensors(r) == ["weight.model.layers.0.mlp.up_proj.weight"]


def test_wrong_dp_loss_averaging_fails_against_dp1_at_step_0(reports):
    r = reports[("dp_mean_of_means", "m4_data_parallel")]
    assert r.verdict == "failed"
    parts = {p.name: p.verdict for p in r.parts}
    assert parts["vs_dp1"] == parts["vs_reference"] == "failed"  # `ranks` follows the weights once they diverge
    n = r.case["world_size"]  # drawn from the seed (2..4)
    assert 2 <= n <= 4 and r.case["shape"]["world_size"] == n
    assert r.localization.step == 0 and r.localization.what.startswith(f"DP={n} vs DP=1")
    assert any(c.argv[2:4] == ["torch.distributed.run", "--standalone"] for c in r.commands)


def test_a_rank_that_idles_while_rank_0_computes_its_rows_fails_the_ranks_part(reports):
    r = reports[("lazy_ranks", "m4_data_parallel")]
    parts = {p.name: p.verdict for p in r.parts}
    assert r.verdict == "failed" and parts == {"vs_dp1": "passed", "vs_reference": "passed", "ranks": "failed"}
    assert r.localization.rank == 0 and r.localization.step == 0 and "valid tokens" in r.localization.what


def test_drawn_longrope_and_padding_catch_engines_that_ignore_them(reports):
    """Tiny cases draw MiniCPM4's LongRoPE (factors, original length) and a pad token half the time each."""
    r = reports[("ignores_rope_scaling", "m1_forward")]
    assert r.verdict == "failed" and r.case["shape"]["rope_scaling"]["type"] == "longrope"
    assert r.localization.layer == 0 and r.localization.tensor == "hidden_states.1"
    r = reports[("ignores_padding_idx", "m2_backward")]
    assert r.verdict == "failed" and r.case["shape"]["pad_token_id"] is not None
    assert r.localization.tensor == "grad.model.embed_tokens.weight"
    assert [d.name for d in r.tensors if not d.ok] == ["grad.model.embed_tokens.weight"]


def test_dropped_rng_state_breaks_bitwise_resume(reports):
    r = reports[("drop_rng_state", "m6_checkpoint")]
    assert r.verdict == "failed"
    parts = {p.name: p.verdict for p in r.parts}
    assert parts == {"resume": "failed", "hf_export": "passed"}
    assert "resume after step 2" in r.localization.what
    bad = [n for n in failed_tensors(r) if n.startswith("resume:")]
    steps = [int(n.split("[")[1][:-1]) for n in bad if "[" in n]
    assert bad and all(t >= 2 for t in steps), "only what follows the resume point may differ"
