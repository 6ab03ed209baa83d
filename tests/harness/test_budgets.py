"""Budgets stop a stage cleanly: rounds per stage, and the run's tokens / cost / wall time."""

from __future__ import annotations

from pathlib import Path

from forge_toy import fake_gate, make_repo, toy_spec, write_spec_file

from harness.ledger import Ledger
from harness.loop import ForgeLoop

USAGE = 'echo \'{"tokens_in": 600, "tokens_out": 100, "cost_usd": 0.75}\' > "$FORGE_USAGE_FILE"'


def _run(tmp_path: Path, **budgets) -> tuple:
    eng = make_repo(tmp_path / "ws")            # broken, and the agent never fixes it
    spec = toy_spec(eng, stages=("m1", "m2"), budgets=budgets,
                    agent={"backend": "shell", "options": {"command": USAGE}})
    state = tmp_path / "s"
    out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state, gate_fn=fake_gate).run()
    return out, Ledger(state / "ledger.jsonl"), eng


def test_rounds_budget_stops_the_stage(tmp_path: Path) -> None:
    out, ledger, eng = _run(tmp_path, rounds_per_stage=2)
    assert out.status == "budget" and out.message == "stage m1: all 2 rounds spent without a pass"
    assert out.stages == {"m1": "budget", "m2": "pending"}
    assert [r.verdict for r in ledger.rounds()] == ["failed", "failed"]
    assert ledger.records()[-1]["event"] == "run_stopped"
    assert (eng / "manifest.json").read_text() == "{}\n"          # nothing committed


def test_token_and_cost_budgets(tmp_path: Path) -> None:
    out, ledger, _ = _run(tmp_path / "t", rounds_per_stage=10, tokens=1500)
    assert out.status == "budget" and out.message.startswith("token budget spent (2100 of 1500)")
    assert len(ledger.rounds()) == 3
    out, ledger, _ = _run(tmp_path / "c", rounds_per_stage=10, cost_usd=1.0)
    assert out.status == "budget" and "cost budget spent ($1.50 of $1.00)" in out.message
    assert ledger.totals()["cost_usd"] == 1.5


def test_wall_budget_is_summed_over_resumes(tmp_path: Path) -> None:
    out, ledger, eng = _run(tmp_path, rounds_per_stage=10, wall_time_s=0.001)
    assert out.status == "budget" and out.message.startswith("wall-time budget spent")
    assert len(ledger.rounds()) == 1
    spec = toy_spec(eng, stages=("m1", "m2"), budgets={"rounds_per_stage": 10, "wall_time_s": 0.001},
                    agent={"backend": "shell", "options": {"command": USAGE}})
    again = ForgeLoop(spec, tmp_path / "toy.toml", engine=eng, state_dir=tmp_path / "s", gate_fn=fake_gate).run(resume=True)
    assert again.status == "budget" and len(Ledger(tmp_path / "s/ledger.jsonl").rounds()) == 1
