"""Rounds run sandboxed: an agent (a shell agent in the loop; an API backend's tool command) sees neither
forge's processes nor its environment, finds the planted key nowhere, writes only its worktree (and its
outbox), keeps git working in its worktree, and has no network."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from forge_toy import FIXED, MODEL_PY, fake_gate, make_repo, make_task, toy_spec, write_spec_file
from wire_servers import Script, anthropic_message, anthropic_tool_use, serve

from harness.agents import get_backend
from harness.ledger import Ledger
from harness.loop import ForgeLoop
from harness.prompts import WORKSPACE_ROOT

KEY = "sk-ant-api03-PLANTED-sandbox-0123456789abcdefghij"

PROBE = r'''
import glob, json, os, socket, subprocess, sys
targets = json.loads(sys.argv[1])
out = {"pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
environs = []
for f in glob.glob("/proc/*/environ"):
    try:
        environs.append(open(f, "rb").read())
    except OSError:
        pass
out["key_in_proc"] = any(targets["key"].encode() in e for e in environs)
out["key_in_env"] = any(targets["key"] in v for v in os.environ.values())
writes = {}
for name, path in targets["writes"].items():
    try:
        with open(path, "a") as f:
            f.write("x\n")
        writes[name] = "written"
    except OSError as e:
        writes[name] = type(e).__name__
out["writes"] = writes
out["exists"] = {name: os.path.exists(p) for name, p in targets["exists"].items()}
try:
    socket.create_connection(("127.0.0.1", targets["port"]), timeout=2)
    out["net"] = "connected"
except OSError as e:
    out["net"] = type(e).__name__
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True)
git("add", "-A")
r = git("-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qm", "agent commit")
out["git_commit"] = r.returncode
out["prompt"] = open(os.environ["FORGE_PROMPT_FILE"]).read()[:20]
open(os.path.join(os.environ["FORGE_OUT_DIR"], "probe.json"), "w").write(json.dumps(out))
'''


def test_a_shell_agent_in_the_round_sandbox(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    eng = make_repo(tmp_path / "ws")
    root = tmp_path / "ws"
    probe, fix = tmp_path / "probe.py", tmp_path / "fixed.py"
    probe.write_text(PROBE)
    fix.write_text(FIXED)
    server = socket.create_server(("127.0.0.1", 0))
    state = tmp_path / "state"
    home_file = Path.home() / ".forge-sandbox-probe"
    targets = {"key": KEY, "port": server.getsockname()[1],
               "writes": {"workspace": str(WORKSPACE_ROOT / "harness" / "probe.txt"),
                          "repo_config": str(root / ".git" / "config"),
                          "repo_checkout": str(root / "gates" / "__init__.py"),
                          "hook": str(root / ".git" / "hooks" / "post-merge"),
                          "home": str(home_file),
                          "engine": str(state / "worktrees/m1-r01/exports/toy_engine/src/toy_engine/model.py")},
               "exists": {"ledger": str(state / "ledger.jsonl"), "inflight": str(state / "inflight.json"),
                          "repo_checkout": str(root / "gates" / "__init__.py"), "workspace": str(WORKSPACE_ROOT / "harness")}}
    command = (f"{sys.executable} {probe} '{json.dumps(targets)}' && cp {fix} "
               "$FORGE_ENGINE_DIR/src/toy_engine/model.py")
    spec = toy_spec(eng, stages=("m1",), agent={"backend": "shell", "share": [str(probe), str(fix)],
                                                 "options": {"command": command}})
    try:
        out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state,
                        gate_fn=fake_gate).run()
    finally:
        server.close()
    assert out.ok, out.message
    got = json.loads((state / "rounds/m1-r01/agent/out/probe.json").read_text())
    assert os.getpid() not in got["pids"] and max(got["pids"]) < 100       # its own PID namespace
    assert not got["key_in_proc"] and not got["key_in_env"]
    # read-only (OSError: EROFS), or hidden (the scratch repository's checkout is not there at all)
    assert got["writes"] == {"workspace": "OSError", "repo_config": "OSError", "repo_checkout": "FileNotFoundError",
                             "hook": "OSError", "home": "written", "engine": "written"}
    assert not home_file.exists()                                   # HOME was a fresh tmpfs
    assert got["exists"] == {"ledger": False, "inflight": False, "repo_checkout": False, "workspace": True}
    assert got["net"] in ("ConnectionRefusedError", "OSError")
    assert got["git_commit"] == 0 and got["prompt"].startswith("#")
    assert (eng / MODEL_PY).read_text() == FIXED and "x\n" not in (root / ".git/config").read_text()
    (rec,) = Ledger(state / "ledger.jsonl").rounds()
    assert rec.isolation == "bwrap" and rec.verdict == "passed"
    # the agent's own commit went to its private objects: the repository has only the harness's commits
    assert "agent commit" not in os.popen(f"git -C {root} log --all --format=%s").read()


def test_an_api_tool_command_is_sandboxed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    wt = make_repo(tmp_path / "wt").parents[1]
    cmd = ("ls /proc | grep -c '^[0-9]'; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c sk-ant; "
           f"touch {WORKSPACE_ROOT}/harness/x 2>&1 | grep -c 'Read-only file system'; env | grep -c KEY")
    script = Script([anthropic_tool_use("t1", "run_command", {"command": cmd}),
                     anthropic_message([{"type": "text", "text": "done"}], "end_turn", (1, 1))])
    with serve(script, "/v1/messages") as url:
        get_backend("anthropic", {"base_url": url, "retry_base_s": 0.01}, "test-model").run(make_task(tmp_path, wt))
    result = script.requests[1]["body"]["messages"][2]["content"][0]["content"]
    nprocs, keys_in_proc, touch, keys_in_env = result.split("--- stdout\n")[1].split("\n")[:4]
    assert int(nprocs) < 10 and keys_in_proc == "0" and touch == "1" and keys_in_env == "0"


def test_without_bubblewrap_a_required_sandbox_stops_the_run(tmp_path: Path, monkeypatch) -> None:
    import pytest

    import gates.sandbox
    from harness.loop import ForgeError

    monkeypatch.setattr(gates.sandbox, "find_bwrap", lambda: None)
    eng = make_repo(tmp_path / "ws")
    for mode in ("required", "preferred"):
        spec = toy_spec(eng, stages=("m1",), rounds=1, agent={"backend": "shell", "sandbox": mode,
                                                              "options": {"command": "true"}})
        loop = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=tmp_path / mode,
                         gate_fn=fake_gate)
        if mode == "required":
            with pytest.raises(ForgeError, match="round sandbox is required but unavailable.*apt-get install bubblewrap"):
                loop.run()
            assert not (tmp_path / mode / "run.json").exists()
        else:
            loop.run()
            (rec,) = Ledger(tmp_path / mode / "ledger.jsonl").rounds()
            assert rec.isolation == "none (bwrap (bubblewrap) not found on PATH)"
