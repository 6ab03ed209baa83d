"""Process control: SIGINT / SIGTERM / SIGHUP to forge end the round's whole process tree (also a child that
left for a session of its own) and record the round `interrupted`; a kill -9 of a sandboxed round leaves
nothing behind; resume ends a recorded group only after checking who it is now."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forge_toy import FIXED, make_repo

from harness.ledger import Ledger
from harness.procs import describe, end_group, wait_gone

HERE = Path(__file__).resolve().parent
# Hangs in m1 round 1: a child in the agent's group and one in a session of its own, both named after $CTRL.
AGENT = r'''
set -eu
if [ "$FORGE_STAGE-$FORGE_ROUND" = m1-1 ]; then
  setsid bash -c 'exec -a "orphan:$CTRL" sleep 300' &
  bash -c 'exec -a "orphan:$CTRL" sleep 300' &
  echo "# half-written edit" >> "$FORGE_ENGINE_DIR/src/toy_engine/model.py"
  touch "$FORGE_OUT_DIR/started"
  wait
fi
cp "$CTRL/fixed.py" "$FORGE_ENGINE_DIR/src/toy_engine/model.py"
'''


def _orphans(ctrl: Path) -> list[int]:
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if f"orphan:{ctrl}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(int(pid))
        except OSError:
            pass
    return out


def _start(tmp_path: Path, sandbox: str, resume: bool = False) -> tuple[subprocess.Popen, Path, Path]:
    eng = tmp_path / "ws" / "exports/toy_engine"
    if not eng.exists():
        make_repo(tmp_path / "ws")
    ctrl, state = tmp_path / "ctrl", tmp_path / "state"
    ctrl.mkdir(exist_ok=True)
    (ctrl / "fixed.py").write_text(FIXED)
    script = tmp_path / "agent.sh"
    script.write_text(AGENT)
    argv = [sys.executable, str(HERE / "forge_driver.py"), str(eng), str(state), str(script), str(ctrl),
            "--sandbox", sandbox] + (["--resume"] if resume else [])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), ctrl, state


def _wait_started(proc: subprocess.Popen, state: Path, ctrl: Path) -> None:
    t0 = time.monotonic()
    while not ((state / "rounds/m1-r01/agent/out/started").exists() and len(_orphans(ctrl)) >= 2):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() - t0 < 60, "the agent never started"
        time.sleep(0.1)
    time.sleep(0.7)  # the watcher has seen every group


@pytest.mark.slow
@pytest.mark.parametrize("sig,sandbox", [(signal.SIGINT, "required"), (signal.SIGTERM, "off"), (signal.SIGHUP, "required")])
def test_a_signal_ends_the_round_and_its_tree(sig: int, sandbox: str, tmp_path: Path) -> None:
    proc, ctrl, state = _start(tmp_path, sandbox)
    _wait_started(proc, state, ctrl)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, out
    assert "STATUS interrupted" in out and f"interrupted by {signal.Signals(sig).name}" in out
    assert wait_gone(_orphans(ctrl), 5), "a process of the round outlived it"
    (rec,) = Ledger(state / "ledger.jsonl").rounds()
    assert (rec.verdict, rec.counted) == ("interrupted", False) and rec.note.startswith("interrupted by")
    assert not (state / "inflight.json").exists() and not any((state / "worktrees").iterdir())
    events = [e["event"] for e in Ledger(state / "ledger.jsonl").records() if e["kind"] == "event"]
    assert events[-1] == "run_interrupted"

    again, _, _ = _start(tmp_path, sandbox, resume=True)          # resume redoes the round and goes on
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "STATUS passed" in out, out
    verdicts = [(r.stage, r.round, r.verdict) for r in Ledger(state / "ledger.jsonl").rounds()]
    assert verdicts == [("m1", 1, "interrupted"), ("m1", 2, "passed"), ("m2", 1, "passed")]


@pytest.mark.slow
def test_kill9_of_a_sandboxed_round_leaves_nothing(tmp_path: Path) -> None:
    proc, ctrl, state = _start(tmp_path, "required")
    _wait_started(proc, state, ctrl)
    proc.kill()
    proc.wait()
    assert wait_gone(_orphans(ctrl), 5), "the sandbox dies with forge"
    inflight = json.loads((state / "inflight.json").read_text())
    assert inflight["procs"] and all(p["cmdlines"] and p["start_ticks"] for p in inflight["procs"])
    again, _, _ = _start(tmp_path, "required", resume=True)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out
    assert [r.verdict for r in Ledger(state / "ledger.jsonl").rounds()] == ["interrupted", "passed", "passed"]


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "30"], start_new_session=True)


def _alive(pid: int) -> bool:
    d = describe(pid)
    return d is not None


def test_resume_ends_a_group_only_after_the_identity_check() -> None:
    p = _sleeper()
    rec = describe(p.pid)
    assert rec is not None
    try:
        reused = rec.model_copy(update={"start_ticks": rec.start_ticks - 5})     # same pid, another process
        assert "is now another process: left alone" in end_group(reused) and _alive(p.pid)
        other_boot = rec.model_copy(update={"boot_id": "another-boot"})
        assert "left alone" in end_group(other_boot) and _alive(p.pid)
        renamed = rec.model_copy(update={"cmdlines": [["python3", "unrelated.py"]], "tag": ""})
        assert "left alone" in end_group(renamed) and _alive(p.pid)
        assert "ended" in end_group(rec)
        p.wait(timeout=5)
    finally:
        p.kill()
        p.wait()


def test_resume_ends_a_group_whose_leader_is_gone() -> None:
    leader = subprocess.Popen(["bash", "-c", "sleep 30 & echo $!; sleep 0.3"], start_new_session=True,
                              stdout=subprocess.PIPE, text=True)
    rec = describe(leader.pid)
    member = int(leader.stdout.readline())
    leader.wait()
    try:
        assert describe(leader.pid) is None and _alive(member)
        assert "ended" in end_group(rec)
        assert wait_gone([member], 5)
    finally:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_api_usage_survives_a_kill_and_is_counted_once(sig: int, tmp_path: Path) -> None:
    """An API round is killed while its tool command runs, after one paid reply: the reply's tokens are in the
    interrupted round (from inflight.json after a kill -9), the resumed run pays for the rest, and the ledger's
    total is exactly what the service served."""
    from wire_servers import Script, anthropic_message, anthropic_tool_use, serve

    eng = make_repo(tmp_path / "ws")
    state, marker = tmp_path / "state", f"orphan:{tmp_path}"
    hang = f'touch "$FORGE_OUT_DIR/cmd-started"; exec -a "{marker}" sleep 300'
    script = Script([anthropic_tool_use("t1", "run_command", {"command": hang}, (1000, 100)),
                     anthropic_tool_use("t2", "write_file", {"path": "exports/toy_engine/src/toy_engine/model.py",
                                                             "content": FIXED}, (2000, 200)),
                     anthropic_message([{"type": "text", "text": "fixed"}], "end_turn", (300, 30))])
    with serve(script, "/v1/messages") as url:
        agent = {"backend": "anthropic", "model": "test-model", "sandbox": "required",
                 "options": {"base_url": url, "retry_base_s": 0.01}}
        argv = [sys.executable, str(HERE / "forge_driver.py"), str(eng), str(state), "-", str(tmp_path),
                "--agent", json.dumps(agent), "--stages", "m1"]
        env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-api03-PLANTED-campaign-0123456789abcdef"}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        t0 = time.monotonic()
        while not (state / "rounds/m1-r01/agent/out/cmd-started").exists():
            assert proc.poll() is None and time.monotonic() - t0 < 60, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        assert wait_gone([int(p) for p in os.listdir("/proc") if p.isdigit() and marker.encode() in _cmdline(p)], 5)
        again = subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=env, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
    r1, r2 = Ledger(state / "ledger.jsonl").rounds()
    assert (r1.verdict, r1.counted, r1.tokens_in, r1.tokens_out) == ("interrupted", False, 1000, 100)
    assert (r2.verdict, r2.tokens_in, r2.tokens_out) == ("passed", 2300, 230)
    totals = Ledger(state / "ledger.jsonl").totals()
    assert (totals["tokens_in"], totals["tokens_out"]) == (3300, 330) and len(script.requests) == 3


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


CLAUDE = r'''#!/usr/bin/env python3
import json, os, sys, time
prompt = sys.stdin.read()
def emit(ev):
    print(json.dumps(ev), flush=True)
emit({"type": "assistant", "message": {"id": "m1", "usage": {"input_tokens": 500, "output_tokens": 50}}})
if "· round 1 of" in prompt.splitlines()[0]:
    open(os.path.join(os.environ["FORGE_OUT_DIR"], "cmd-started"), "w").close()
    os.execvp("bash", ["bash", "-c", 'exec -a "$MARK" sleep 300'])
open("exports/toy_engine/src/toy_engine/model.py", "w").write(open(os.environ["FIX"]).read())
emit({"type": "result", "subtype": "success", "is_error": False, "result": "fixed", "num_turns": 1,
      "usage": {"input_tokens": 700, "output_tokens": 70}, "total_cost_usd": 0.02})
'''


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_cli_agent_usage_survives_a_kill(sig: int, tmp_path: Path) -> None:
    """A CLI agent's streamed usage is saved as it arrives: after a kill -9 or a Ctrl-C mid-round the interrupted
    round has it, and its processes are gone."""
    eng = make_repo(tmp_path / "ws")
    bin_dir, fix, state, marker = tmp_path / "bin", tmp_path / "fixed.py", tmp_path / "state", f"orphan:{tmp_path}"
    bin_dir.mkdir()
    (bin_dir / "claude").write_text(CLAUDE)
    (bin_dir / "claude").chmod(0o755)
    fix.write_text(FIXED)
    agent = {"backend": "claude_code", "sandbox": "required", "share": [str(fix)],
             "env": {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FIX": str(fix), "MARK": marker}}
    argv = [sys.executable, str(HERE / "forge_driver.py"), str(eng), str(state), "-", str(tmp_path),
            "--agent", json.dumps(agent), "--stages", "m1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    while not (state / "rounds/m1-r01/agent/out/cmd-started").exists():
        assert proc.poll() is None and time.monotonic() - t0 < 60, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert wait_gone([int(p) for p in os.listdir("/proc") if p.isdigit() and marker.encode() in _cmdline(p)], 5)
    again = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    r1, r2 = Ledger(state / "ledger.jsonl").rounds()
    assert (r1.verdict, r1.tokens_in, r1.tokens_out) == ("interrupted", 500, 50)
    assert (r2.verdict, r2.tokens_in, r2.tokens_out, r2.cost_usd) == ("passed", 700, 70, 0.02)
