"""Honest outcomes: a round whose agent failed is `error` whatever the gates say (the note says when the engine
already passed), and is never committed; `--agent` merges with the spec's per-stage agent options, and
`--agent-option model=...` / `--model` set the model that reaches the service."""

from __future__ import annotations

from pathlib import Path

from forge_toy import FIXED, fake_gate, git, make_repo, toy_spec, write_spec_file, write_toml_spec
from typer.testing import CliRunner
from wire_servers import Script, anthropic_error, serve

from gates.report import GateReport, Part
from harness.ledger import Ledger
from harness.loop import ForgeLoop
from harness.spec import parse_spec, with_overrides


def _run(tmp_path: Path, model_src: str, command: str) -> tuple:
    eng = make_repo(tmp_path / "ws", model_src)
    spec = toy_spec(eng, stages=("m1",), rounds=1, agent={"backend": "shell", "options": {"command": command}})
    state = tmp_path / "s"
    out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state, gate_fn=fake_gate).run()
    return out, Ledger(state / "ledger.jsonl").rounds(), tmp_path / "ws"


def test_a_failed_agent_on_an_engine_that_already_passes_is_an_error(tmp_path: Path) -> None:
    out, (rec,), root = _run(tmp_path, FIXED, "echo 'cannot reach the service' >&2; exit 3")
    assert rec.verdict == "error" and rec.agent_error == "exit 3" and [g.verdict for g in rec.gates] == ["passed"]
    assert rec.note == ("the agent failed (exit 3); the engine already passed this stage's gates before the round: "
                        "nothing to commit")
    assert not out.ok and out.status == "budget" and rec.commit is None
    assert git(root, "log", "--format=%s", "main").splitlines() == ["toy workspace"]


def test_a_failed_agents_passing_edits_are_not_committed(tmp_path: Path) -> None:
    fix = FIXED.replace("\n", "\\n")
    out, (rec,), root = _run(tmp_path, FIXED.replace("* 2 + 1", "* 3 + 1"),
                             f"printf '{fix}' > $FORGE_ENGINE_DIR/src/toy_engine/model.py; exit 1")
    assert rec.verdict == "error" and rec.note == ("the agent failed (exit 1); its partial edits pass the gates but "
                                                  "are not committed")
    assert rec.changed == ["exports/toy_engine/src/toy_engine/model.py"] and not out.ok
    assert git(root, "log", "--format=%s", "main").splitlines() == ["toy workspace"]


def test_agent_override_merges_with_the_stage_tables(tmp_path: Path) -> None:
    eng = make_repo(tmp_path / "ws")
    base = toy_spec(eng, stages=("m1", "m2"), agent={"backend": "claude_code", "model": "opus",
                                                     "options": {"max_turns": 5}, "timeout_s": 99})
    data = base.model_dump(mode="python")
    data["stages"][1]["agent"] = {"backend": "codex", "model": "o3", "options": {"sandbox": "read-only"}, "timeout_s": 7}
    spec = parse_spec(data)
    same = with_overrides(spec, backend="codex", options={"extra_args": ["--x"]})
    m1, m2 = same.stages
    assert same.agent_for(m2).options == {"sandbox": "read-only", "extra_args": ["--x"]}       # kept, merged
    assert same.agent_for(m2).model == "o3" and same.agent_for(m2).timeout_s == 7
    assert same.agent_for(m1).backend == "codex" and same.agent_for(m1).options == {"extra_args": ["--x"]}
    assert same.agent_for(m1).model is None and same.agent_for(m1).timeout_s == 99            # claude's model dropped
    both = with_overrides(spec, model="gpt-5")
    m1, m2 = both.stages
    assert both.agent_for(m1).model == both.agent_for(m2).model == "gpt-5"
    assert both.agent_for(m1).options == {"max_turns": 5}                                      # no --agent: as is


def test_agent_option_model_reaches_the_service(tmp_path: Path, monkeypatch) -> None:
    from harness.cli import app

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-api03-outcomes-0123456789abcdefghij")
    eng = make_repo(tmp_path / "ws")
    spec_file = write_toml_spec(tmp_path / "s.toml", toy_spec(eng, stages=("m1",)))
    for flags, model in ((["--agent-option", "model=claude-from-option"], "claude-from-option"),
                         (["--model", "claude-from-flag"], "claude-from-flag")):
        script = Script([anthropic_error(401)])
        with serve(script, "/v1/messages") as url:
            r = CliRunner().invoke(app, ["forge", "--spec", str(spec_file), "--agent", "anthropic", *flags,
                                         "--agent-option", f"base_url={url}", "--state-dir", str(tmp_path / model)])
        assert r.exit_code == 5, r.output
        assert script.requests[0]["body"]["model"] == model


def test_a_stage_passed_over_an_accepted_unsupported_part_says_so_on_the_console(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from harness.gating import GateOutcome

    def gate_fn(gate, engine_dir, spec, out_dir):  # the toy gate, then an MFU part this machine cannot measure
        out = fake_gate(gate, engine_dir, spec, out_dir)
        report = out_dir / "m5.json"
        report.write_text(GateReport(gate=gate.name, verdict="unsupported", parts=[
            Part(name="loss", verdict=out.verdict), Part(name="mfu", verdict="unsupported", message="GPU only")]).model_dump_json())
        return GateOutcome(gate.name, "unsupported", out.metrics, None, out.time_s, report,
                           {"loss": out.verdict, "mfu": "unsupported"})

    eng = make_repo(tmp_path / "ws", FIXED)
    spec = toy_spec(eng, stages=("m1",), rounds=1)
    data = spec.model_dump(mode="python")
    data["stages"][0]["gates"][0]["allow_unsupported"] = ["mfu"]
    console = Console(file=io.StringIO(), width=200)
    out = ForgeLoop(parse_spec(data), write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=tmp_path / "s",
                    gate_fn=gate_fn, console=console).run()
    text = console.file.getvalue()
    assert out.ok, text
    assert "gate m1_forward: unsupported (accepted by the spec)" in text
    assert "stage m1 passed (m1_forward mfu unsupported) in round 1" in text and "stage m1 passed in round" not in text
