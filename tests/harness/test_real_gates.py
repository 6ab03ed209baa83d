"""The forge CLI with the workspace's real gates (gates/runner.py) on a scratch copy of
exports/train_engine_0.5B broken on purpose: M1 fails with the real localization, the replayed fix
passes, is committed with manifest.json, and lands. Skipped until the gates and the engine exist.

The full `demo` (all six stage-1 gates, training, inspect) takes minutes on a loaded 2-core box: it runs
here only with FORGE_TEST_DEMO=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.demo import SOURCE_ENGINE, break_engine, prepare, record
from harness.gating import runner_available
from harness.ledger import Ledger
from harness.prompts import WORKSPACE_ROOT

needs_real = pytest.mark.skipif(not runner_available() or not (SOURCE_ENGINE / "src").is_dir(),
                                reason="needs gates/runner.py and exports/train_engine_0.5B")


@needs_real
@pytest.mark.slow  # the CLI end to end with the real gates: ~25 s
def test_forge_cli_m1_with_real_gates(tmp_path: Path) -> None:
    eng = prepare(tmp_path / "scratch")
    sab, target = break_engine(eng)
    record(eng, sab, target, tmp_path / "rec")
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "harness", "forge", "--spec", str(WORKSPACE_ROOT / "specs/tiny-cpu.toml"),
            "--engine", str(eng), "--agent", "replay", "--agent-option", f"recording={tmp_path / 'rec'}",
            "--stage", "m1", "--state-dir", str(state)]
    r = subprocess.run(argv, cwd=WORKSPACE_ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(WORKSPACE_ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    r1, r2 = Ledger(state / "ledger.jsonl").rounds()
    assert (r1.verdict, r2.verdict) == ("failed", "passed")
    prompt2 = (state / "rounds/m1-r02/prompt.md").read_text()
    assert "Round 1 ended **failed**" in prompt2 and "hidden_states.1 (layer 0)" in prompt2
    manifest = json.loads((eng / "manifest.json").read_text())
    assert manifest["gates"]["m1_forward"]["verdict"] == "passed"
    assert manifest["gates"]["m1_forward"]["commit"] == r2.commit
    assert manifest["gates"]["m1_forward"]["report"] == "forge/reports/m1_forward.json"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=eng, capture_output=True, text=True).stdout.strip()
    assert head == r2.tip
    assert target.read_text() == subprocess.run(["git", "show", f"HEAD~3:{target.relative_to(eng)}"], cwd=eng,
                                                capture_output=True, text=True).stdout


@needs_real
@pytest.mark.skipif(os.environ.get("FORGE_TEST_DEMO") != "1", reason="minutes long: set FORGE_TEST_DEMO=1")
def test_demo_end_to_end(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "harness", "demo", "--out", str(tmp_path / "demo"), "--steps", "30"],
                       cwd=WORKSPACE_ROOT, capture_output=True, text=True, timeout=3000,
                       env={**os.environ, "PYTHONPATH": str(WORKSPACE_ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "demo passed" in r.stderr
    assert len((r.stdout + r.stderr).splitlines()) <= 60  # the detail is in the files it names
