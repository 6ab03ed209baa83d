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
