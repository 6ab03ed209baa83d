"""CLI agents (claude_code, codex) under real conditions, with a stand-in CLI that streams Claude Code's
`stream-json` events: usage counted per event and the CLI stopped at the run's budget, a timeout that keeps
what was spent, login failures and a missing CLI that stop the run (exit 5 through the CLI), and the network:
only the service, through the egress proxy, from inside the round sandbox."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from forge_toy import make_repo, make_task, toy_spec, write_toml_spec
from typer.testing import CliRunner
from wire_servers import Script, anthropic_message, serve

from harness.agents import get_backend
from harness.agents.base import AgentFatal, BudgetSpent
from harness.procs import wait_gone

FAKE = r'''#!/usr/bin/env python3
import http.client, json, os, socket, sys, time
mode = os.environ["FAKE_MODE"]
sys.stdin.read()
def emit(ev):
    print(json.dumps(ev), flush=True)
def usage(i, tin, tout):
    emit({"type": "assistant", "message": {"id": f"m{i}", "usage": {"input_tokens": tin, "output_tokens": tout}}})
emit({"type": "system", "subtype": "init", "pid": os.getpid()})
if mode == "forever":
    i = 0
    while True:
        i += 1
        usage(i, 1000, 100)
        usage(i, 1000, 100)          # a message streams in several lines: counted once
        time.sleep(0.02)
if mode == "slow":
    usage(1, 500, 50)
    time.sleep(60)
if mode == "login":
    emit({"type": "result", "subtype": "success", "is_error": True, "result": "Invalid API key · Please run /login"})
    sys.exit(1)
if mode == "net":
    out = {}
    proxy = os.environ["HTTPS_PROXY"].rsplit(":", 1)
    for target in os.environ["TARGETS"].split(","):
        host, port = target.rsplit(":", 1)
        c = http.client.HTTPConnection(proxy[0].split("//")[1], int(proxy[1]), timeout=5)
        c.set_tunnel(host, int(port))
        try:
            c.request("POST", "/v1/messages", body=b"{}", headers={"content-type": "application/json"})
            out[target] = c.getresponse().status
        except OSError as e:
            out[target] = str(e)[:60]
    try:                                  # around the proxy: the host's loopback is not this sandbox's
        socket.create_connection(("127.0.0.1", int(os.environ["TARGETS"].split(",")[0].rsplit(":", 1)[1])), timeout=2)
        out["direct"] = "connected"
    except OSError as e:
        out["direct"] = type(e).__name__
    emit({"type": "result", "subtype": "success", "is_error": False, "result": json.dumps(out), "num_turns": 1,
          "usage": {"input_tokens": 1, "output_tokens": 1}, "total_cost_usd": 0.0})
'''


def _install(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "claude").write_text(FAKE)
    (bin_dir / "claude").chmod(0o755)
    return bin_dir


def _task(tmp_path: Path, mode: str, **env: str):
    wt = make_repo(tmp_path / "wt").parents[1]
    path = f"{_install(tmp_path)}:{os.environ['PATH']}"
    return make_task(tmp_path, wt, env={"PATH": path, "HOME": str(Path.home()), "FAKE_MODE": mode, **env})


def test_a_cli_agent_is_stopped_at_the_budget(tmp_path: Path) -> None:
    task = _task(tmp_path, "forever")
    task.meter.token_limit = 5000
    with pytest.raises(BudgetSpent, match="token budget reached.*claude was stopped"):
        get_backend("claude_code").run(task)
    assert task.meter.tokens_in == 5000 and task.meter.tokens_out == 500          # 5 messages, each counted once
    pid = json.loads((tmp_path / "logs/claude.stdout").read_text().splitlines()[0])["pid"]
    assert pid < 100                                                              # in its own PID namespace


def test_a_timed_out_cli_agent_keeps_its_usage(tmp_path: Path) -> None:
    task = _task(tmp_path, "slow")
    task.timeout_s = 1.5
    res = get_backend("claude_code").run(task)
    assert res.error == "timeout" and (task.meter.tokens_in, task.meter.tokens_out) == (500, 50)


def test_a_login_failure_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(AgentFatal, match="claude_code cannot work: Invalid API key"):
        get_backend("claude_code").run(_task(tmp_path, "login"))
    bin_dir = tmp_path / "bin"
    (bin_dir / "codex").write_text('#!/usr/bin/env bash\ncat >/dev/null\n'
                                   'echo \'{"type":"turn.failed","error":{"message":"unexpected status 401 Unauthorized"}}\'\n'
                                   'exit 1\n')
    (bin_dir / "codex").chmod(0o755)
    wt = make_repo(tmp_path / "c/wt").parents[1]
    with pytest.raises(AgentFatal, match="codex cannot work: unexpected status 401"):
        get_backend("codex").run(make_task(tmp_path / "c", wt, env={"PATH": f"{bin_dir}:/usr/bin:/bin"}))


def test_a_missing_cli_exits_5_with_the_reason(tmp_path: Path) -> None:
    """Never "stage m1 passed" on an engine that passes as it is: the run stops before any gate."""
    from harness.cli import app

    eng = make_repo(tmp_path / "ws")
    spec = toy_spec(eng, stages=("m1",), agent={"backend": "replay", "env": {"PATH": "/nonexistent"}})
    r = CliRunner().invoke(app, ["forge", "--spec", str(write_toml_spec(tmp_path / "s.toml", spec)),
                                 "--agent", "claude_code", "--state-dir", str(tmp_path / "state")])
    assert r.exit_code == 5, r.output
    assert "'claude' not found on the agent's PATH" in r.output and "passed" not in r.output


def test_network_only_to_the_service(tmp_path: Path) -> None:
    """Inside the sandbox the agent reaches the allowed service through the proxy; another port is refused
    (403), and the host's loopback cannot be reached around the proxy."""
    script = Script([anthropic_message([{"type": "text", "text": "hi"}], "end_turn", (1, 1))])
    with serve(script, "/v1/messages") as url:
        allowed = url.removeprefix("http://")
        denied = "127.0.0.1:9"
        task = _task(tmp_path, "net", TARGETS=f"{allowed},{denied}")
        res = get_backend("claude_code", {"network_allow": [allowed]}).run(task)
    out = json.loads(res.summary)
    assert out[allowed] == 200 and len(script.requests) == 1
    assert "403" in str(out[denied]) and out["direct"] in ("ConnectionRefusedError", "OSError", "TimeoutError")
    log = (tmp_path / "logs/egress.log").read_text()
    assert f"tunnel {allowed}" in log and f"denied CONNECT {denied}" in log


def test_the_cli_is_gone_after_the_round(tmp_path: Path) -> None:
    task = _task(tmp_path, "slow")
    task.timeout_s = 1.0
    spawned: list[int] = []
    task.on_spawn = spawned.append
    get_backend("claude_code").run(task)
    assert spawned and wait_gone(spawned, 5)
