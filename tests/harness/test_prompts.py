"""Every stage template renders for every shipped spec (StrictUndefined: no variable passes silently),
with and without feedback; a template naming an unknown variable fails."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from harness.prompts import PROMPTS_DIR, Feedback, OpContext, environment, render, stage_templates
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
            op = OpContext("rmsnorm", "step_time_s", True, "python -m x bench", best=0.5 if fb else None, best_round=1)
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
               op=OpContext(stage.ops[0], "t", True, "cmd") if stage.kind == "ops" else None)


def test_strict_undefined(tmp_path: Path) -> None:
    (tmp_path / "m1.md.j2").write_text("{{ spec.name }} {{ no_such_variable }}\n")
    spec = load_spec(SPECS[0])
    with pytest.raises(jinja2.UndefinedError):
        render(spec, spec.stages[0], prompts_dir=tmp_path, round_no=1, max_rounds=1, engine_dir=Path("/e"))
    assert environment(PROMPTS_DIR).undefined is jinja2.StrictUndefined
