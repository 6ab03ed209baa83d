"""The loop with the shell backend: a script agent that reads its prompt, fixes the engine once the
feedback says where it diverges, and reports usage; it runs in the round sandbox, its environment holds no key."""

from __future__ import annotations

import json
import os
from pathlib import Path

from forge_toy import FIXED, MODEL_PY, fake_gate, make_repo, toy_spec, write_spec_file

from harness.ledger import Ledger
from harness.loop import ForgeLoop

AGENT = r'''
set -eu
env > "$FORGE_OUT_DIR/env"
echo '{"tokens_in": 1200, "tokens_out": 340, "cost_usd": 0.0123}' > "$FORGE_USAGE_FILE"
if grep -q "reference 2.0" "$FORGE_PROMPT_FILE"; then      # the feedback names the divergence: fix it
  cp "$FIX" "$FORGE_ENGINE_DIR/src/toy_engine/model.py"
  echo "fixed forward from the gate's localization"
else
  echo "# touched" >> "$FORGE_ENGINE_DIR/README.md"      # a first blind attempt: no fix
  echo "looked around"
fi
'''


def test_shell_agent_fixes_engine_from_feedback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-SECRET-0123456789")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-SECRET-9876543210")
    eng = make_repo(tmp_path / "ws")
    fix = tmp_path / "fixed_model.py"
    fix.write_text(FIXED)
    script = tmp_path / "agent.sh"
    script.write_text(AGENT)
    spec = toy_spec(eng, backend="shell", stages=("m1",),
                    options={"command": f"bash {script}"},
                    agent={"backend": "shell", "options": {"command": f"bash {script}"}, "share": [str(script), str(fix)],
                           "env": {"FIX": str(fix)}, "timeout_s": 60})
    state = tmp_path / "state"
    gate_envs: list[dict] = []

    def env_recording_gate(gate, engine_dir, spec, out_dir):    # gates run agent-written engine code
        gate_envs.append(dict(os.environ))
        return fake_gate(gate, engine_dir, spec, out_dir)

    out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state,
                    gate_fn=env_recording_gate).run()
    assert out.ok
    assert gate_envs and not any("SECRET" in v for env in gate_envs for v in env.values())
    assert os.environ["ANTHROPIC_API_KEY"] == "sk-ant-test-SECRET-0123456789"   # given back after the run
    rounds = Ledger(state / "ledger.jsonl").rounds()
    assert [r.verdict for r in rounds] == ["failed", "passed"]
    assert all(r.tokens_in == 1200 and r.tokens_out == 340 and r.cost_usd == 0.0123 for r in rounds)
    assert rounds[0].changed == ["exports/toy_engine/README.md"]
    assert (eng / MODEL_PY).read_text() == FIXED
    # carried: round 2 started from round 1's edit, so the README change is committed too
    assert "# touched" in (eng / "README.md").read_text()

    # Keys stay with the harness: not in the agent's environment, not in the ledger, not in any state file.
    for n in (1, 2):
        dump = state / f"rounds/m1-r0{n}/agent/out/env"
        env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
        assert not any("SECRET" in v for v in env.values())
        assert "ANTHROPIC_API_KEY" not in env and "OPENAI_API_KEY" not in env
        assert set(env) <= {"PATH", "HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "USER", "FIX", "PWD", "SHLVL", "_",
                            "OLDPWD", "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES"} | {
            k for k in env if k.startswith("FORGE_")}
    assert all(r.isolation == "bwrap" for r in rounds)
    for f in state.rglob("*"):
        if f.is_file():
            assert b"SECRET" not in f.read_bytes(), f
    assert "SECRET" not in (eng / "forge/ledger.jsonl").read_text()


def test_key_named_in_spec_is_refused(tmp_path: Path) -> None:
    import pytest

    from harness.spec import SpecError

    eng = make_repo(tmp_path / "ws")
    with pytest.raises(SpecError, match=r"agent.env_allow: .*'ANTHROPIC_API_KEY' looks like a secret"):
        toy_spec(eng, agent={"backend": "shell", "options": {"command": "true"},
                             "env_allow": ["PATH", "ANTHROPIC_API_KEY"]})


def test_agent_env_drops_secrets_even_when_allowed() -> None:
    from harness.agents._env import agent_env

    env = agent_env(["PATH", "MY_TOKEN", "HOME"], {"X": "1", "GH_TOKEN": "t"},
                    source={"PATH": "/bin", "MY_TOKEN": "abc", "HOME": "/h", "OTHER": "o"})
    assert env == {"PATH": "/bin", "HOME": "/h", "X": "1"}
    assert os.environ.get("PATH")  # the harness's own env is untouched
    assert json.dumps(env)
