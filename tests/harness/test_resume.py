"""kill -9 a forge run mid-round (twice: in the first stage, then after it passed) and resume it; what the killed
agent wrote itself (a key-shaped token in its outbox) is scrubbed by the resume, as a finished round's would be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from forge_toy import FIXED, MODEL_PY, git, make_repo

from harness.ledger import Ledger

HERE = Path(__file__).resolve().parent
TOKEN = "sk-ant-api03-WRITTEN-by-a-killed-agent-0123456789"
AGENT = r'''
set -eu
if [ -e "$CTRL/hang-$FORGE_STAGE-$FORGE_ROUND" ]; then
  echo "token ''' + TOKEN + r'''" > "$FORGE_OUT_DIR/notes"
  echo "$$" > "$CTRL/started-$FORGE_STAGE-$FORGE_ROUND"
  echo "# half-written edit" >> "$FORGE_ENGINE_DIR/src/toy_engine/model.py"
  sleep 300
fi
cp "$CTRL/fixed.py" "$FORGE_ENGINE_DIR/src/toy_engine/model.py"
'''


def _start(eng: Path, state: Path, script: Path, ctrl: Path, resume: bool) -> subprocess.Popen:
    argv = [sys.executable, str(HERE / "forge_driver.py"), str(eng), str(state), str(script), str(ctrl)]
    return subprocess.Popen(argv + (["--resume"] if resume else []), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _kill_when_started(proc: subprocess.Popen, marker: Path, timeout: float = 90) -> int:
    t0 = time.monotonic()
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() - t0 < timeout, "the agent never started"
        time.sleep(0.1)
    time.sleep(0.3)
    agent_pid = int(marker.read_text())
    proc.send_signal(signal.SIGKILL)          # the forge process only: its agent is orphaned, still sleeping
    proc.wait()
    return agent_pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:                 # a zombie is dead enough
        return f.read().split()[2] != "Z"


def test_kill9_mid_round_then_resume(tmp_path: Path) -> None:
    eng = make_repo(tmp_path / "ws")
    ctrl = tmp_path / "ctrl"
    ctrl.mkdir()
    (ctrl / "fixed.py").write_text(FIXED)
    (ctrl / "hang-m1-1").touch()
    (ctrl / "hang-m2-1").touch()
    script = tmp_path / "agent.sh"
    script.write_text(AGENT)
    state = tmp_path / "state"

    # Run A: killed during m1 round 1.
    a = _start(eng, state, script, ctrl, resume=False)
    orphan_a = _kill_when_started(a, ctrl / "started-m1-1")
    assert _alive(orphan_a)
    assert (state / "inflight.json").is_file()
    inflight = json.loads((state / "inflight.json").read_text())
    assert inflight["key"] == "m1"
    (group,) = [p for p in inflight["procs"] if p["pgid"] == os.getpgid(orphan_a)]  # recorded with its identity
    assert group["start_ticks"] > 0 and any(str(script) in " ".join(c) for c in group["cmdlines"])

    # Run B: resumes; m1 round 2 passes; killed during m2 round 1.
    b = _start(eng, state, script, ctrl, resume=True)
    orphan_b = _kill_when_started(b, ctrl / "started-m2-1")
    assert not _alive(orphan_a), "resume must kill the interrupted round's agent"
    assert TOKEN not in (state / "rounds/m1-r01/agent/out/notes").read_text()

    # Run C: resumes and finishes without redoing m1.
    c = _start(eng, state, script, ctrl, resume=True)
    out, _ = c.communicate(timeout=120)
    assert c.returncode == 0, out
    assert "STATUS passed" in out and "stage m1: passed earlier, skipped" in out
    assert not _alive(orphan_b)
    assert not [f for f in state.rglob("*") if f.is_file() and TOKEN.encode() in f.read_bytes()]

    rounds = Ledger(state / "ledger.jsonl").rounds()
    assert [(r.stage, r.round, r.verdict, r.counted) for r in rounds] == [
        ("m1", 1, "interrupted", False), ("m1", 2, "passed", True), ("m2", 1, "interrupted", False),
        ("m2", 2, "passed", True)]
    events = [e["event"] for e in Ledger(state / "ledger.jsonl").records() if e["kind"] == "event"]
    assert events.count("run_resumed") == 2 and events[-1] == "run_passed"

    root = tmp_path / "ws"
    assert (eng / MODEL_PY).read_text() == FIXED                       # no half-written edit survived
    assert git(root, "worktree", "list").count("\n") == 0              # no stray worktree
    assert not any((state / "worktrees").iterdir()) and not (state / "inflight.json").exists()
    git(root, "fsck", "--no-dangling")
    assert git(root, "status", "--porcelain") == ""
    subjects = git(root, "log", "--format=%s", "main").splitlines()
    assert sum(s.startswith("forge(m1): m1_forward passed") for s in subjects) == 1
