"""`bash agent-loop.sh gate` hands its options to the gates as typed GateOptions (in-process, CliRunner)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import gates.runner
from harness.cli import app
from gates.report import GateReport


def test_gate_cli_passes_tp_and_refuses_a_bad_one(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def fake_run_gate(gate, engine, options):
        seen["options"] = options
        return GateReport(gate=gate, verdict="passed", message="fake", engine=str(engine))

    monkeypatch.setattr(gates.runner, "run_gate", fake_run_gate)
    r = CliRunner().invoke(app, ["gate", "m1", "--engine", str(tmp_path), "--tp", "2", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert seen["options"].tp == 2
    r = CliRunner().invoke(app, ["gate", "m1", "--engine", str(tmp_path), "--tp", "0", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "tp" in r.output and seen["options"].tp == 2  # refused before any gate ran


def test_gate_help_names_the_first_and_last_gate() -> None:
    """The NAME help spans every gate the runner has (it once stopped at m6 while m7 and m8 ran)."""
    r = CliRunner().invoke(app, ["gate", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    first, *_, last = gates.runner.GATES
    assert f"{first} .. {last}" in r.output
    assert f"{first.split('_')[0]} .. {last.split('_')[0]}" in r.output


def test_sigterm_ends_the_gate_its_engine_and_its_work_folders(tmp_path: Path) -> None:
    """A gate killed from outside (a CI or device timeout) leaves no engine running and no work folder behind:
    on the H200 such leftovers (checkpoints) once filled the disk for the next gates."""
    import os
    import signal
    import subprocess
    import sys
    import time

    eng = tmp_path / "eng" / "src" / "fake"
    eng.mkdir(parents=True)
    pid_file = tmp_path / "pid"
    (eng / "__main__.py").write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    p = subprocess.Popen([sys.executable, "-m", "harness", "gate", "m1", "--engine", str(tmp_path / "eng"),
                          "--sandbox", "off", "--timeout", "100", "--out", str(tmp_path / "reports")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    end = time.monotonic() + 60
    while not pid_file.is_file() and time.monotonic() < end:
        time.sleep(0.1)
    assert pid_file.is_file(), "the fake engine never started"
    assert any(tmp.iterdir()), "the gate made no work folder under TMPDIR"
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=30)[0].decode()
    assert p.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM" in out
    time.sleep(0.2)
    try:
        os.kill(int(pid_file.read_text()), 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the engine outlived the gate"
    assert not list(tmp.iterdir()), f"left behind: {sorted(x.name for x in tmp.iterdir())}"
