"""claude_code and codex against stand-in CLIs on the agent's PATH that print each tool's output format
(Claude Code's `--output-format stream-json` events; Codex's `exec --json` JSONL events), in the round
sandbox: the fakes read their fix from a shared path and leave their argv and environment in the outbox."""

from __future__ import annotations

import os
from pathlib import Path

from forge_toy import FIXED, MODEL_PY, fake_gate, make_repo, make_task, toy_spec, write_spec_file

import pytest

from harness.agents import get_backend
from harness.agents.base import AgentFatal
from harness.ledger import Ledger
from harness.loop import ForgeLoop

FAKE_CLAUDE = r'''#!/usr/bin/env bash
printf '%s\n' "$@" > "$FORGE_OUT_DIR/args"
env > "$FORGE_OUT_DIR/args.env"
prompt="$(cat)"
if printf '%s' "$prompt" | grep -q "reference 2.0"; then cp "$FIX" exports/toy_engine/src/toy_engine/model.py; fi
cat <<JSON
{"type":"result","subtype":"success","is_error":false,"duration_ms":1200,"num_turns":7,"result":"done: $(pwd | xargs basename)","session_id":"s1","total_cost_usd":0.4321,"usage":{"input_tokens":1000,"cache_creation_input_tokens":200,"cache_read_input_tokens":3000,"output_tokens":456}}
JSON
'''

FAKE_CODEX = r'''#!/usr/bin/env bash
printf '%s\n' "$@" > "$FORGE_OUT_DIR/args"
prompt="$(cat)"
echo '{"type":"thread.started","thread_id":"t1"}'
echo '{"type":"turn.started"}'
echo '{"type":"item.completed","item":{"id":"i1","type":"command_execution","command":"ls","aggregated_output":"x","exit_code":0}}'
if printf '%s' "$prompt" | grep -q "reference 2.0"; then cp "$FIX" exports/toy_engine/src/toy_engine/model.py; fi
echo '{"type":"item.completed","item":{"id":"i2","type":"agent_message","text":"patched forward"}}'
echo '{"type":"turn.completed","usage":{"input_tokens":5000,"cached_input_tokens":4000,"output_tokens":700}}'
'''


def _install(bin_dir: Path, name: str, text: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    p = bin_dir / name
    p.write_text(text)
    p.chmod(0o755)


def _run_loop(tmp_path: Path, backend: str, options: dict, model: str | None) -> tuple[list, Path]:
    eng = make_repo(tmp_path / "ws")
    fix = tmp_path / "fixed.py"
    fix.write_text(FIXED)
    bin_dir = tmp_path / "bin"
    _install(bin_dir, "claude", FAKE_CLAUDE)
    _install(bin_dir, "codex", FAKE_CODEX)
    spec = toy_spec(eng, stages=("m1",), agent={
        "backend": backend, "model": model, "options": options, "share": [str(fix)],
        "env": {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FIX": str(fix)}})
    state = tmp_path / "s"
    out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state, gate_fn=fake_gate).run()
    assert out.ok, out.message
    assert (eng / MODEL_PY).read_text() == FIXED
    rounds = Ledger(state / "ledger.jsonl").rounds()
    assert all(r.isolation == "bwrap" for r in rounds)
    return rounds, state / "rounds/m1-r02/agent/out/args"


def test_claude_code_headless(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-SECRET-its-own-key-123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-SECRET-not-its-key-456")
    rounds, args = _run_loop(tmp_path, "claude_code", {"max_turns": 50}, "opus")
    assert [r.verdict for r in rounds] == ["failed", "passed"]
    r = rounds[1]
    assert (r.tokens_in, r.tokens_out, r.cost_usd) == (4200, 456, 0.4321)
    argv = args.read_text().split("\n")
    assert argv[:7] == ["-p", "--output-format", "stream-json", "--verbose", "--permission-mode", "bypassPermissions",
                        "--model"]
    assert "--max-turns" in argv and "50" in argv
    # its own key, in the process that calls the API, and no other (stored redacted: the outbox is swept)
    env = args.with_name("args.env").read_text()
    assert "ANTHROPIC_API_KEY=[redacted]" in env and "OPENAI" not in env and "SECRET" not in env
    assert "HTTPS_PROXY=http://127.0.0.1:3128" in env


def test_codex_exec_json(tmp_path: Path) -> None:
    rounds, args = _run_loop(tmp_path, "codex", {"price_in_per_mtok": 1.25, "price_out_per_mtok": 10.0}, None)
    assert [r.verdict for r in rounds] == ["failed", "passed"]
    r = rounds[1]
    assert (r.tokens_in, r.tokens_out) == (5000, 700) and abs(r.cost_usd - (5000 * 1.25 + 700 * 10) / 1e6) < 1e-12
    argv = args.read_text().split("\n")
    assert argv[:4] == ["exec", "--json", "--skip-git-repo-check", "-C"] and "-" in argv
    assert argv[argv.index("--sandbox") + 1] == "workspace-write"


def test_cli_missing_and_failing(tmp_path: Path) -> None:
    wt = make_repo(tmp_path / "wt").parents[1]
    task = make_task(tmp_path, wt, env={"PATH": "/nonexistent"}, timeout_s=2)
    with pytest.raises(AgentFatal, match="'claude' not found on the agent's PATH"):
        get_backend("claude_code").run(task)
    bin_dir = tmp_path / "bin"
    _install(bin_dir, "codex", '#!/usr/bin/env bash\ncat >/dev/null\n'
             'echo \'{"type":"turn.failed","error":{"message":"usage limit reached"}}\'\nexit 1\n')
    _install(bin_dir, "claude", "#!/usr/bin/env bash\nsleep 30\n")
    task.env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    assert get_backend("codex").run(task).error == "usage limit reached"
    res = get_backend("claude_code").run(task)
    assert res.error == "timeout" and not task.meter.reported
