"""Every stage template renders for every shipped spec (StrictUndefined: no variable passes silently),
with and without feedback; a template naming an unknown variable fails."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from harness.prompts import PROMPTS_DIR, WORKSPACE_ROOT, Feedback, OpContext, environment, render, stage_templates
from harness.spec import load_spec

SPECS = sorted((Path(__file__).resolve().parents[2] / "specs").glob("*.toml"))
FEEDBACK = [None,
            Feedback(round=2, verdict="failed", carried=True, agent_error="timeout",
                     gates=[{"name": "m1_forward", "verdict": "failed", "metrics": {"worst_rel": 0.31},
                             "localization": "hidden_states.1: rel 3.1e-01", "report": "/r/m1_forward.json"}]),
            Feedback(round=3, verdict="rejected", forbidden=["gates/m1_forward.py (outside the engine)"])]


def test_templates_exist() -> None:
    assert {"m1", "m2", "m3", "m4", "m5", "m6", "op_round"} <= set(stage_templates())


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_every_template_renders_for_every_spec(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    for template in stage_templates():
        base = spec.stages[0]
        stage = base.model_copy(update={"prompt": template})
        for fb in FEEDBACK:
            op = OpContext("rms_norm", "step_time_s", True, best=0.5 if fb else None, best_round=1)
            text = render(spec, stage, round_no=1, max_rounds=spec.rounds_for(stage), engine_dir=Path("/wt/e"),
                          feedback=fb, op=op if template == "op_round" else None)
            assert spec.name in text and "/wt/e" in text and "## Rules" in text
            assert "agent-loop.sh gate" in text and "exits 77" in text
            if fb is not None and fb.forbidden:
                assert "gates/m1_forward.py (outside the engine)" in text
            if fb is not None and fb.gates:
                assert "hidden_states.1: rel 3.1e-01" in text and "still in the worktree" in text
    for stage in spec.stages:                                 # and each stage with its own template
        render(spec, stage, round_no=2, max_rounds=3, engine_dir=Path("/e"), feedback=FEEDBACK[1],
               op=OpContext(stage.ops[0], "t", True) if stage.kind == "ops" else None)


def test_strict_undefined(tmp_path: Path) -> None:
    (tmp_path / "m1.md.j2").write_text("{{ spec.name }} {{ no_such_variable }}\n")
    spec = load_spec(SPECS[0])
    with pytest.raises(jinja2.UndefinedError):
        render(spec, spec.stages[0], prompts_dir=tmp_path, round_no=1, max_rounds=1, engine_dir=Path("/e"))
    assert environment(PROMPTS_DIR).undefined is jinja2.StrictUndefined


def test_the_op_round_prompt_carries_contract_reference_leaderboard_and_last_failure(tmp_path: Path) -> None:
    """From the real engine's op table and a leaderboard in the export: what an LLM backend reads in an op round."""
    import json
    import shutil

    from harness.prompts import op_material

    engine = tmp_path / "train_engine_0.5B"
    shutil.copytree(WORKSPACE_ROOT / "exports/train_engine_0.5B/src", engine / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.gz"))
    board = engine / "forge/leaderboards/swiglu.json"
    board.parent.mkdir(parents=True)
    rows = [{"impl": "triton_fused", "values": {"block": 512}, "verdict": "passed", "ms": 0.25, "message": "ok",
             "timing": {"roofline_pct": 71.5}, "checked_at": "2026-12-03T07:00:00Z"},
            {"impl": "triton_fused", "values": {"block": 256}, "verdict": "failed", "ms": None, "timing": None,
             "message": "edge 1x1: output 0: non-finite values", "checked_at": "2026-12-03T07:01:00Z"}]
    board.write_text(json.dumps({"op": "swiglu", "entries": rows}))
    spec = load_spec(WORKSPACE_ROOT / "specs/minicpm4-0.5b-h100.toml")
    stage = next(s for s in spec.stages if s.kind == "ops")
    op = OpContext("swiglu", "step_time_s", True, best=0.41, **op_material(engine, "swiglu"))
    text = render(spec, stage, round_no=3, max_rounds=30, engine_dir=engine, op=op)
    assert "swiglu(gate, up) -> silu(gate) * up" in text  # the contract
    assert "def swiglu(" in text and "ops/swiglu/reference.py" in text  # the reference's source
    assert "`block` in [256, 512, 1024, 2048, 4096] (default 1024)" in text  # the declared space
    assert "| triton_fused | {'block': 512} | passed | 0.25 | 71.5 |" in text  # the leaderboard
    assert "{'block': 256}: edge 1x1: output 0: non-finite values" in text  # the last failure
    assert "step_time_s = 0.41" in text and "gates' clock" in text
