"""The forge CLI under a terminal's Ctrl-C and a kill -9, as a user runs it (`bash agent-loop.sh forge`): the
kill campaign drives the loop through forge_driver.py; this checks the command itself, with its real gates'
runner and its seal. Ctrl-C goes to the whole foreground process group, as a terminal sends it: forge exits
130, ends the round's tree and says how to resume; after a kill -9 of forge alone the resume ends the orphans.
A planted key is found in no file, git object or process environment, though the agent reads forge's."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from forge_toy import make_repo, toy_spec, write_toml_spec

from harness.ledger import Ledger
from harness.procs import wait_gone

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-ant-api03-PLANTED-cli-signals-7d1e0c9b8a"
# The round's mode is in $CTRL/mode: hang (children in the agent's group and in a session of their own), or fatal
# (command not found: the run stops at once, before any gate). Unsandboxed: it reads forge's own environment.
AGENT = r'''
set -u
p=$PPID
until tr '\0' ' ' < "/proc/$p/cmdline" | grep -q -- "-m harness forge" || [ "$p" -le 1 ]; do
  p=$(cut -d' ' -f4 "/proc/$p/stat")
done
[ "$p" -gt 1 ] || exit 3
tr '\0' '\n' < "/proc/$p/environ" > "$FORGE_OUT_DIR/forge-environ"
if [ "$(cat "$CTRL/mode")" = fatal ]; then exit 127; fi
setsid bash -c 'exec -a "$MARK" sleep 300' &
bash -c 'exec -a "$MARK" sleep 300' &
touch "$FORGE_OUT_DIR/at-agent"
wait
'''


def _marked(marker: str) -> list[int]:
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(int(pid))
        except OSError:
            pass
    return out


def _environ_holders(value: str) -> list[int]:
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if value.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                out.append(int(pid))
        except OSError:
            pass
    return out


def _forge(spec: Path, state: Path, resume: bool) -> subprocess.Popen:
    argv = ["bash", str(ROOT / "agent-loop.sh"), "forge", "--spec", str(spec), "--state-dir", str(state)]
    return subprocess.Popen(argv + (["--resume"] if resume else []), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "ANTHROPIC_API_KEY": KEY, "COLUMNS": "200"},
                            start_new_session=True)  # its own group: the test plays the terminal


def _at_agent(proc: subprocess.Popen, state: Path, marker: str, round_no: int) -> None:
    at = state / f"rounds/m1-r{round_no:02d}/agent/out/at-agent"
    t0 = time.monotonic()
    while not (at.exists() and len(_marked(marker)) >= 2):
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read() if proc.stdout else "")
        assert time.monotonic() - t0 < 90, "the agent never started"
        time.sleep(0.1)
    time.sleep(0.7)  # the watcher has seen every group
    assert _environ_holders(KEY) == [], "a key in a process's environment (forge is sealed, its agent gets none)"


@pytest.mark.slow
def test_ctrl_c_and_kill9_of_the_forge_command(tmp_path: Path) -> None:
    eng = make_repo(tmp_path / "ws")
    ctrl, state, marker = tmp_path / "ctrl", tmp_path / "state", f"orphan:{tmp_path}"
    ctrl.mkdir()
    (ctrl / "mode").write_text("hang")
    (tmp_path / "agent.sh").write_text(AGENT)
    agent = {"backend": "shell", "sandbox": "off", "options": {"command": f"bash {tmp_path / 'agent.sh'}"},
             "env": {"CTRL": str(ctrl), "MARK": marker}}
    spec = write_toml_spec(tmp_path / "toy.toml", toy_spec(eng, stages=("m1",), rounds=3, agent=agent))
    try:
        # Ctrl-C: SIGINT to the foreground group (forge; its agent leads a session of its own)
        a = _forge(spec, state, resume=False)
        _at_agent(a, state, marker, 1)
        os.killpg(a.pid, signal.SIGINT)
        out, _ = a.communicate(timeout=60)
        assert a.returncode == 130, out
        said = " ".join(out.split())  # the console wraps long lines
        assert "interrupted by SIGINT" in said and f"forge --spec {spec} --resume --state-dir {state}" in said, out
        assert wait_gone(_marked(marker), 5), "the round's processes outlived the Ctrl-C"
        assert not (state / "inflight.json").exists()

        # kill -9 of forge alone (an OOM kill): the unsandboxed agent's processes live on, recorded for resume
        b = _forge(spec, state, resume=True)
        _at_agent(b, state, marker, 2)
        b.kill()
        b.wait()
        orphans = _marked(marker)
        assert orphans and (state / "inflight.json").exists()

        # the resume ends them by group, records the round once, and the agent's fatal error stops the run (exit 5)
        (ctrl / "mode").write_text("fatal")
        c = _forge(spec, state, resume=True)
        out, _ = c.communicate(timeout=120)
        assert c.returncode == 5 and "command not found" in out, out
        assert wait_gone(orphans, 5), "resume left the killed round's processes running"
    finally:
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)
    rounds = Ledger(state / "ledger.jsonl").rounds()
    assert [(r.round, r.verdict, r.counted) for r in rounds] == [(1, "interrupted", False), (2, "interrupted", False),
                                                                (3, "agent_failed", False)]
    # the agent read forge's environment (3 rounds); neither that, nor anything else written, holds the key
    environs = list(state.glob("rounds/m1-r*/agent/out/forge-environ"))
    assert len(environs) == 3 and all("PATH=" in f.read_text() for f in environs)
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
    objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=tmp_path / "ws",
                             capture_output=True).stdout
    assert objects and KEY.encode() not in objects
