"""The comparative bf16 rule end to end on CPU: M1 on a small bfloat16 tiny case, where the correct red-team
base engine passes, and the `residual_scale` engine (layer 1's residual branches scaled by scale_depth / L)
and the `non_causal` engine fail at their layer. Every reference answer comes with its float32 twin's, and
the report keeps both errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gates.runner import GateOptions, run_gate

pytestmark = pytest.mark.slow

ENGINES = Path(__file__).parents[1] / "redteam" / "engines"
SEED = 7  # drawn shape: 3 layers, seq 77 (gates/case.py draw_shape)
FLAWED = ["residual_scale", "non_causal"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    opts = GateOptions(seed=SEED, dtype="bfloat16", reference_cache=tmp_path_factory.mktemp("refcache"), timeout_s=600)
    base = run_gate("m1", ENGINES / "base", opts)  # fills the reference cache, which the flawed pair then shares
    with ThreadPoolExecutor(2) as pool:
        flawed = dict(zip(FLAWED, pool.map(lambda e: run_gate("m1", ENGINES / e, opts), FLAWED)))
    return {"base": base} | flawed


def test_correct_engine_passes_with_both_errors_recorded(reports):
    base = reports["base"]
    assert base.verdict == "passed", base.message
    assert base.policy["ratio"] == 2.0 and "comparative" in base.policy["describe"]
    assert base.case["dtype"] == "bfloat16" and base.case["shape"]["num_layers"] == 3
    twin = [c for c in base.case["derived"] if c["label"].startswith("float32 twin")]
    assert len(twin) == 1 and twin[0]["dtype"] == "float32"
    for d in base.tensors:
        assert d.ref_rel is not None and d.ref_rel > 0, d.name
        assert d.bound_rel == pytest.approx(2.0 * max(d.ref_rel, 2**-8 if d.name == "loss" else 0) + 2e-5)
        assert d.rel <= d.bound_rel and d.max_rel <= d.bound_max


@pytest.mark.parametrize("engine, layer", [("residual_scale", 1), ("non_causal", 0)])
def test_structural_bugs_fail_at_their_layer(reports, engine, layer):
    bad = reports[engine]
    tensor = f"hidden_states.{layer + 1}"
    assert bad.verdict == "failed"
    assert (bad.localization.layer, bad.localization.tensor) == (layer, tensor), bad.localization.what
    by_name = {d.name: d for d in bad.tensors}
    assert all(by_name[f"hidden_states.{i}"].ok for i in range(layer + 1)), "the layers before the bug are right"
    first = by_name[tensor]
    assert first.rel > first.bound_rel > 2 * first.ref_rel and "2 x the reference's rel" in first.note


def test_the_fixed_bf16_pair_could_not_see_the_residual_scale_bug(reports):
    """Its error (~1 %) is below the old fixed bf16 bound rel 5e-2: only the comparative rule catches it."""
    first = next(d for d in reports["residual_scale"].tensors if d.name == "hidden_states.2")
    assert first.rel < 5e-2 and first.max_rel < 1e-1 and not first.ok
