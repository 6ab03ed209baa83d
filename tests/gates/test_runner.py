"""The runner's contract with the forge loop: names, options, and that everything an engine can do
wrong (hang, crash, say unsupported, break the layout, write nothing) is a verdict, not an exception.
Fake engines here are a few lines of Python without torch, so these tests take seconds."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gates.report import load_report
from gates.runner import ALIASES, GATES, GateOptions, resolve_name, run_all, run_gate, stage_verdict


def fake_engine(root: Path, body: str, pkg: str = "fake") -> Path:
    src = root / "src" / pkg
    src.mkdir(parents=True)
    (src / "__main__.py").write_text(textwrap.dedent(body))
    return root


def test_registry_is_ordered_cheapest_first():
    assert list(GATES) == ["m1_forward", "m2_backward", "m3_optimizer", "m4_data_parallel", "m5_long_train", "m6_checkpoint",
                           "m7_pretrain", "m8_resume"]
    assert resolve_name("m4") == "m4_data_parallel" and set(ALIASES.values()) == set(GATES)
    with pytest.raises(KeyError):
        resolve_name("m9")


def test_options_defaults():
    o = GateOptions()
    assert (o.reference, o.case, o.world_size, o.device, o.seed) == ("torch", "tiny", None, "cpu", None)
    assert o.case_dtype == "float32" and GateOptions(device="cuda").case_dtype == "bfloat16"


def test_bad_layout_is_an_error_verdict(tmp_path):
    r = run_gate("m1", tmp_path, GateOptions())
    assert (r.verdict, r.error_type) == ("error", "layout")
    fake_engine(tmp_path / "two", "", "a")
    (tmp_path / "two/src/b").mkdir()
    (tmp_path / "two/src/b/__main__.py").write_text("")
    r = run_gate("m1", tmp_path / "two", GateOptions())
    assert r.error_type == "layout" and "exactly one" in r.message


def test_timeout_is_a_verdict_and_kills_the_engine(tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    monkeypatch.setenv("FAKE_PID_FILE", str(pid_file))
    eng = fake_engine(tmp_path / "eng", """
        import os, time
        open(os.environ["FAKE_PID_FILE"], "w").write(str(os.getpid()))
        time.sleep(120)
    """)
    # sandbox off: the fake writes its pid outside the box (bubblewrap's own tests: test_sandbox.py)
    r = run_gate("m1_forward", eng, GateOptions(timeout_s=3, out_dir=tmp_path / "reports", sandbox="off"))
    assert (r.verdict, r.error_type) == ("error", "timeout") and r.time_s < 30
    assert r.commands[0].timed_out
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    assert load_report(tmp_path / "reports" / "m1_forward.json").error_type == "timeout"


def test_engine_is_isolated_and_declining_fails(tmp_path, monkeypatch):
    """An engine that exits 77 on a gate's probe has declined it: `failed`, never `unsupported`."""
    spy = tmp_path / "spy.json"
    monkeypatch.setenv("FAKE_SPY", str(spy))
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    eng = fake_engine(tmp_path / "eng", """
        import json, os, sys
        case = sys.argv[sys.argv.index("--case") + 1]
        json.dump({"cwd": sorted(os.listdir(".")), "case": sorted(os.listdir(case)),
                   "pythonpath": os.environ.get("PYTHONPATH")}, open(os.environ["FAKE_SPY"], "w"))
        sys.exit(77)
    """)
    r = run_gate("m2", eng, GateOptions(seed=11, sandbox="off"))  # the spy writes outside the box
    assert (r.verdict, r.message) == ("failed", "the engine declined `probe backward` (exit 77)")
    assert r.localization.what == "engine probe backward: the engine declined `probe backward` (exit 77)"
    seen = json.loads(spy.read_text())
    assert seen["cwd"] == ["case"]
    assert seen["case"] == ["batches.safetensors", "case.json", "weights.safetensors"]
    assert seen["pythonpath"] == str(eng.resolve() / "src")
    assert r.case["seed"] == 11 and r.engine_package == "fake"
    assert [c.role for c in r.commands] == ["engine probe backward"]  # the reference never ran


def test_crash_and_missing_outputs(tmp_path):
    crash = fake_engine(tmp_path / "crash", "raise SystemExit('boom: out of luck')")
    r = run_gate("m1", crash, GateOptions())
    assert (r.verdict, r.error_type) == ("error", "engine_crash") and "boom" in r.artifacts["stderr_tail"]
    lazy = fake_engine(tmp_path / "lazy", "pass")
    r = run_gate("m3", lazy, GateOptions())
    assert r.verdict == "failed" and "tensors.safetensors" in r.localization.what


def test_unknown_reference_is_unsupported():
    """A missing reference stack is the gate's own limit: `unsupported`, and the message says so."""
    base = Path(__file__).parents[1] / "redteam" / "engines" / "base"
    r = run_gate("m1", base, GateOptions(reference="no-such-stack"))
    assert r.verdict == "unsupported" and r.message.startswith("gate limit: the reference stack 'no-such-stack'")
    assert [c.role for c in r.commands] == ["engine probe forward"]


def test_run_all_stops_at_first_failure_and_stage_verdict(tmp_path):
    lazy = fake_engine(tmp_path / "lazy", "pass")
    reports = run_all(lazy, GateOptions())
    assert [r.gate for r in reports] == ["m1_forward"] and stage_verdict(reports) == "failed"
    assert stage_verdict([]) == "error"  # gates that did not run are never a pass


def test_cli_exit_codes(tmp_path):
    from harness.cli import app

    cli = CliRunner()
    res = cli.invoke(app, ["gate", "m1", "--engine", str(tmp_path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 3 and (tmp_path / "r" / "m1_forward.json").is_file()
    assert cli.invoke(app, ["gate", "m9", "--engine", str(tmp_path)]).exit_code == 2
    lazy = fake_engine(tmp_path / "lazy", "pass")
    assert cli.invoke(app, ["gate", "all", "--engine", str(lazy), "--out", str(tmp_path / "r2")]).exit_code == 1


def test_torchrun_failures_are_read_per_rank(tmp_path):
    """Under torchrun every rank exiting 77 is the engine declining (`failed`); one rank crashing is an error
    naming it."""
    declines = fake_engine(tmp_path / "u", "raise SystemExit(77)")
    r = run_gate("m4", declines, GateOptions())
    assert (r.verdict, r.message) == ("failed", "the engine declined `probe steps` (exit 77)")
    crash = fake_engine(tmp_path / "c", """
        import os, sys
        sys.exit(3 if os.environ.get("RANK") == "1" else 0)
    """)
    r = run_gate("m4", crash, GateOptions())
    assert (r.verdict, r.error_type, r.localization.rank) == ("error", "engine_crash", 1)


def test_engine_metrics_enter_the_report_bounded():
    """The report keeps what the engine's metrics.json says it ran (e.g. its op implementations), whole when
    small; an oversized or non-object file is replaced by a note instead of bloating the report."""
    from gates.context import _bounded

    small = {"probe": "forward", "ops": {"mlp": "quack_dgated"}}
    assert _bounded(small) == small
    assert "left out" in _bounded({"blob": "x" * 10_000})["note"]
    assert "not an object" in _bounded([1, 2])["note"]
