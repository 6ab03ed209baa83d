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
