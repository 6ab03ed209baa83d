"""Secrets stay secret: one redaction filter (exact key values plus token shapes); a sealed process whose
/proc/<pid>/environ holds no key; and a planted key that a CLI agent is given and leaks everywhere it can
(stdout, stderr, its answer, its outbox, a source file) found nowhere on disk, in git, or in any other
process's environment, while a second key it must never get is not even in its sandbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forge_toy import FIXED, make_repo

from harness.ledger import Ledger
from harness.procs import descendants
from harness.secrets import VAULT, holds_secret, redact, redact_bytes

HERE = Path(__file__).resolve().parent
OWN_KEY = "PLANTED-own-key-0a1b2c3d4e5f6071"          # no known shape: only the exact-value filter catches it
OTHER_KEY = "sk-proj-PLANTED-other-key-9f8e7d6c5b4a3210"
GH_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"  # never in any environment: caught by its shape


def test_the_filter_redacts_values_and_token_shapes(monkeypatch) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", "plain-value-1234")
    text = (f"key plain-value-1234 and sk-ant-api03-{'x' * 30} and {GH_TOKEN} and Bearer abcdefghijklmnopqrstuvwxyz012 "
            "and x-api-key: 0123456789abcdef0123 but not task-force-0123456789abcdef or sha 3f5a9c")
    out = redact(text)
    assert out.count("[redacted]") == 5 and "plain-value" not in out and "ghp_" not in out
    assert "task-force-0123456789abcdef" in out and "sha 3f5a9c" in out and out.startswith("key [redacted] and")
    assert redact_bytes(text.encode()) == out.encode() and holds_secret(text.encode())
    assert not holds_secret(b"nothing to see")


def test_withheld_keys_live_in_the_vault_only(monkeypatch) -> None:
    from harness.secrets import withheld

    monkeypatch.setenv("ANTHROPIC_API_KEY", OTHER_KEY)
    with withheld() as names:
        assert "ANTHROPIC_API_KEY" in names and "ANTHROPIC_API_KEY" not in os.environ
        assert VAULT.get("ANTHROPIC_API_KEY") == OTHER_KEY and redact(OTHER_KEY) == "[redacted]"
        child = subprocess.run(["env"], capture_output=True, text=True).stdout
        assert OTHER_KEY not in child
    assert os.environ["ANTHROPIC_API_KEY"] == OTHER_KEY


def test_a_sealed_process_shows_no_key_in_proc_environ() -> None:
    code = ("from harness.secrets import seal, VAULT; import os, subprocess; seal(); "
            "print(VAULT.get('ANTHROPIC_API_KEY'), 'ANTHROPIC_API_KEY' in os.environ); "
            "print(subprocess.run(['sh', '-c', 'cat /proc/$PPID/environ 2>&1 | tr \"\\\\0\" \"\\\\n\"'], "
            "capture_output=True, text=True).stdout)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "ANTHROPIC_API_KEY": OTHER_KEY, "PYTHONPATH": str(HERE.parents[1])})
    first, rest = r.stdout.split("\n", 1)
    assert first == f"{OTHER_KEY} False", r.stderr
    assert OTHER_KEY not in rest and ("PATH=" in rest or "Permission denied" in rest)  # root reads it; others may not


# A stand-in Claude Code: leaks its own key everywhere in round 1; fixes the engine in round 2.
LEAKY = r'''#!/usr/bin/env python3
import glob, json, os, sys, time
key = os.environ.get("ANTHROPIC_API_KEY", "")
prompt = sys.stdin.read()
def emit(ev):
    print(json.dumps(ev), flush=True)
others = 0
for f in glob.glob("/proc/*/environ"):
    try:
        others += os.environ["OTHER_MARK"][::-1].encode() in open(f, "rb").read()  # reversed: not itself a match
    except OSError:
        pass
emit({"type": "assistant", "message": {"id": "m1", "content": [{"type": "text", "text": f"my key is {key}"}],
      "usage": {"input_tokens": 10, "output_tokens": 5}}})
print(f"stderr: {key} {os.environ['GH']}", file=sys.stderr, flush=True)
eng = "exports/toy_engine/src/toy_engine"
if "ended **rejected**" in prompt:
    open(f"{eng}/model.py", "w").write(open(os.environ["FIX"]).read())
else:
    open(f"{eng}/leak.py", "w").write(f"KEY = {key!r}\nGH = {os.environ['GH']!r}\n")
    open(os.path.join(os.environ["FORGE_OUT_DIR"], "notes.txt"), "w").write(key)
    open(os.path.join(os.environ["FORGE_OUT_DIR"], "running"), "w").write("")
    time.sleep(2.0)
emit({"type": "result", "subtype": "success", "is_error": False, "result": f"done; key {key}; others {others}",
      "num_turns": 1, "usage": {"input_tokens": 10, "output_tokens": 5}, "total_cost_usd": 0.01})
'''


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
def test_a_planted_key_is_found_nowhere(tmp_path: Path) -> None:
    eng = make_repo(tmp_path / "ws")
    bin_dir, fix = tmp_path / "bin", tmp_path / "fixed.py"
    bin_dir.mkdir()
    (bin_dir / "claude").write_text(LEAKY)
    (bin_dir / "claude").chmod(0o755)
    fix.write_text(FIXED)
    state = tmp_path / "state"
    agent = {"backend": "claude_code", "share": [str(fix)], "sandbox": "required",
             "env": {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FIX": str(fix), "GH": GH_TOKEN,
                     "OTHER_MARK": OTHER_KEY[:24][::-1]}}
    argv = [sys.executable, str(HERE / "forge_driver.py"), str(eng), str(state), "-", str(tmp_path),
            "--agent", json.dumps(agent), "--stages", "m1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "ANTHROPIC_API_KEY": OWN_KEY, "OPENAI_API_KEY": OTHER_KEY})
    running = state / "rounds/m1-r01/agent/out/running"
    t0 = time.monotonic()
    while not running.exists():
        assert proc.poll() is None and time.monotonic() - t0 < 60, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    # while the agent runs: no key in forge's environment; the other key in no process of the run; the own key
    # only in the agent's own processes (bwrap and what runs inside it)
    tree = [proc.pid, *descendants(proc.pid)]
    assert OWN_KEY.encode() not in _environ(proc.pid) and OTHER_KEY.encode() not in _environ(proc.pid)
    assert not any(OTHER_KEY.encode() in _environ(p) for p in tree)
    holders = [p for p in tree if OWN_KEY.encode() in _environ(p)]
    assert holders and all(p == proc.pid or "bwrap" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                           or _ancestor_is_bwrap(p) for p in holders)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    r1, r2 = Ledger(state / "ledger.jsonl").rounds()
    assert r1.verdict == "rejected" and r1.forbidden == ["exports/toy_engine/src/toy_engine/leak.py (held a secret: redacted)"]
    assert r2.verdict == "passed" and "others 0" in (state / "rounds/m1-r01/agent/claude.stdout").read_text()

    # nothing on disk (state, logs, the repository's files and refs) ...
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.parent != bin_dir:
            data = f.read_bytes()
            assert OWN_KEY.encode() not in data and OTHER_KEY.encode() not in data and GH_TOKEN.encode() not in data, f
    # ... nor in any git object, reachable or not
    objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=tmp_path / "ws",
                             capture_output=True).stdout
    assert objects and OWN_KEY.encode() not in objects and GH_TOKEN.encode() not in objects
    assert OWN_KEY not in out and GH_TOKEN not in out
    assert "[redacted]" in (state / "rounds/m1-r01/agent/out/notes.txt").read_text()


def _ancestor_is_bwrap(pid: int) -> bool:
    for _ in range(20):
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(text[text.rindex(")") + 2:].split()[1])
        if pid <= 1:
            return False
        if b"bwrap" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return True
    return False
