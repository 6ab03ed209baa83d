"""An agent edit outside the allowed paths rejects the round before any gate runs; the next round's
prompt says which paths; the workspace's own gates are never the ones the agent edited."""

from __future__ import annotations

from pathlib import Path

from forge_toy import FIXED, fake_gate, git, make_repo, toy_spec, write_spec_file

from harness.ledger import Ledger
from harness.loop import ForgeLoop

AGENT = r'''
set -eu
if [ "$FORGE_ROUND" = 1 ]; then
  echo "def passes(): return True  # agent was here" >> "$FORGE_WORKTREE/gates/__init__.py"
  cp "$FIX" "$FORGE_ENGINE_DIR/src/toy_engine/model.py"
elif [ "$FORGE_ROUND" = 2 ]; then
  echo '{"gates": {"m1_forward": {"verdict": "passed"}}}' > "$FORGE_ENGINE_DIR/manifest.json"
  cp "$FIX" "$FORGE_ENGINE_DIR/src/toy_engine/model.py"
elif [ "$FORGE_ROUND" = 3 ]; then
  ln -s ../../../../gates/__init__.py "$FORGE_ENGINE_DIR/src/toy_engine/gate_link.py"
  cp "$FIX" "$FORGE_ENGINE_DIR/src/toy_engine/model.py"
else
  cp "$FIX" "$FORGE_ENGINE_DIR/src/toy_engine/model.py"
fi
'''


def test_edits_outside_allowed_paths_reject_the_round(tmp_path: Path) -> None:
    eng = make_repo(tmp_path / "ws")
    fix = tmp_path / "fixed.py"
    fix.write_text(FIXED)
    script = tmp_path / "agent.sh"
    script.write_text(AGENT)
    gate_calls: list[str] = []

    def counting_gate(gate, engine_dir, spec, out_dir):
        gate_calls.append(str(engine_dir))
        return fake_gate(gate, engine_dir, spec, out_dir)

    spec = toy_spec(eng, stages=("m1",), rounds=5,
                    agent={"backend": "shell", "options": {"command": f"bash {script}"}, "env": {"FIX": str(fix)},
                           "share": [str(script), str(fix)]})
    state = tmp_path / "state"
    out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state, gate_fn=counting_gate).run()
    assert out.ok
    rounds = Ledger(state / "ledger.jsonl").rounds()
    assert [r.verdict for r in rounds] == ["rejected", "rejected", "rejected", "passed"]
    assert rounds[0].forbidden == ["gates/__init__.py (outside the engine)"]
    assert rounds[1].forbidden == ["exports/toy_engine/manifest.json (written by the harness only)"]
    assert "symlink leaving the engine" in rounds[2].forbidden[0]
    assert all(not r.gates for r in rounds[:3]) and len(gate_calls) == 1   # rejected rounds are never gated
    assert "gates/__init__.py (outside the engine)" in (state / "rounds/m1-r02/prompt.md").read_text()
    # Rejected edits are never carried into the next round, nor committed.
    root = tmp_path / "ws"
    assert "agent was here" not in (root / "gates/__init__.py").read_text()
    assert "agent was here" not in git(root, "show", "main:gates/__init__.py")
    assert "gate_link" not in git(root, "ls-tree", "-r", "--name-only", "main")


def test_tampering_with_the_workspace_gates_stops_the_run(tmp_path: Path) -> None:
    """An agent that edits the harness's own gate code (outside its worktree) stops the run; in the round
    sandbox (the default) it cannot even reach that code."""
    guarded = tmp_path / "workspace_gates"
    guarded.mkdir()
    (guarded / "m1_forward.py").write_text("def run(): ...\n")
    for sandbox, verdict in (("off", "tampered"), ("required", "error")):  # error: the write fails inside
        eng = make_repo(tmp_path / sandbox / "ws")
        spec = toy_spec(eng, stages=("m1",), rounds=1, agent={"backend": "shell", "sandbox": sandbox, "options": {
            "command": f"echo 'def run(): return \"passed\"' > {guarded}/m1_forward.py"}})
        state = tmp_path / sandbox / "state"
        out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state, gate_fn=fake_gate,
                        guard=[guarded]).run()
        assert [r.verdict for r in Ledger(state / "ledger.jsonl").rounds()] == [verdict]
        assert out.status == ("tampered" if sandbox == "off" else "budget")
        if sandbox == "off":
            (guarded / "m1_forward.py").write_text("def run(): ...\n")
    assert (guarded / "m1_forward.py").read_text() == "def run(): ...\n"
