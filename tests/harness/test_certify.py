"""`certify`: a spec's gate stages run on the engine as committed (never the working tree), the accepted ones
recorded in manifest.json through the loop's recorder, an accepted `unsupported` part recorded as unsupported (and
shown so by `inspect`), a stage that is not accepted recorded not at all. Gates are faked: no engine code runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gates.report import GateReport, Part
from harness.certify import certify
from harness.cli import app
from harness.gating import GateOutcome
from harness.inspection import collect
from harness.prompts import WORKSPACE_ROOT
from harness.spec import GateCheck, load_spec, with_overrides

SPEC = WORKSPACE_ROOT / "specs/tiny-cpu.toml"
MFU_WHY = "MFU is measured on GPU only; this run is on cpu"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def engine(tmp_path: Path) -> Path:
    eng = tmp_path / "repo/exports/eng"
    (eng / "src/eng_pkg").mkdir(parents=True)
    (eng / "src/eng_pkg/__main__.py").write_text("VERSION = 'committed'\n")
    (eng / "manifest.json").write_text(json.dumps({"engine": "eng", "gates": {}, "kept": "by others"}))
    _git(tmp_path / "repo", "init", "-q", "-b", "main")
    _git(tmp_path / "repo", "add", "-A")
    _git(tmp_path / "repo", "commit", "-q", "-m", "engine")
    (eng / "src/eng_pkg/__main__.py").write_text("VERSION = 'uncommitted'\n")  # the working tree is never judged
    return eng


def fake_gates(verdicts: dict[str, str], seen: list[str]):  # noqa: ANN201 - a GateFn
    """A GateFn: each gate's verdict from `verdicts` (default passed), M5 `unsupported` in its mfu part only."""
    def gate_fn(gate: GateCheck, engine_dir: Path, spec, out_dir: Path) -> GateOutcome:  # noqa: ANN001
        seen.append((engine_dir / "src/eng_pkg/__main__.py").read_text())
        verdict = verdicts.get(gate.name, "passed")
        parts = {"loss": "passed", "mfu": "unsupported"} if verdict == "unsupported" else {}
        out_dir.mkdir(parents=True, exist_ok=True)
        report = out_dir / f"{gate.name}.json"
        report.write_text(GateReport(gate=gate.name, verdict=verdict, parts=[
            Part(name=p, verdict=v, message=MFU_WHY if v == "unsupported" else "") for p, v in parts.items()]).model_dump_json())
        return GateOutcome(gate.name, verdict, {"worst_rel": 1e-7, "seed": 3}, None, 1.5, report, parts)
    return gate_fn


def test_certify_records_the_committed_engine_and_unsupported_as_unsupported(engine: Path, tmp_path: Path) -> None:
    spec = with_overrides(load_spec(SPEC), engine_path=str(engine))
    seen: list[str] = []
    cert = certify(spec, SPEC, engine, out_dir=tmp_path / "reports",
                   gate_fn=fake_gates({"m5_long_train": "unsupported"}, seen))
    head = _git(engine, "rev-parse", "HEAD")
    assert cert.passed and cert.rev == head
    assert cert.recorded == [s.name for s in spec.stages]
    assert set(seen) == {"VERSION = 'committed'\n"}
    m = json.loads((engine / "manifest.json").read_text())
    assert m["kept"] == "by others" and m["commit"] == head and "forge" not in m  # no forge run wrote it
    assert set(m["gates"]) == {g.name for s in spec.stages for g in s.gates}
    m5 = m["gates"]["m5_long_train"]
    assert (m5["verdict"], m5["unsupported"], m5["by"], m5["stage"]) == ("unsupported", {"mfu": MFU_WHY}, "certify", "m5")
    assert m5["report"] == "forge/reports/m5_long_train.json"
    assert json.loads((engine / m5["report"]).read_text())["verdict"] == "unsupported"
    ins = collect(engine, probe_ops=False)
    rows = {g["gate"]: g["verdict"] for g in ins.gates}
    assert rows["m5_long_train"] == "passed (mfu unsupported)" and rows["m1_forward"] == "passed"
    assert any("recorded by `certify`" in n and head[:10] in n for n in ins.notes)
    # the working tree's uncommitted edit is not what certify judged, and inspect says so
    assert any("changed since" in n and "1 file(s) (src/eng_pkg/__main__.py)" in n for n in ins.notes)


def test_a_stage_not_accepted_is_not_recorded_and_stops_certify(engine: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict.toml"  # unsupported parts not accepted: M5 on the CPU is then no proof
    strict.write_text(SPEC.read_text().replace('allow_unsupported = ["mfu"]', ""))
    spec = with_overrides(load_spec(strict), engine_path=str(engine))
    seen: list[str] = []
    cert = certify(spec, strict, engine, out_dir=tmp_path / "reports",
                   gate_fn=fake_gates({"m5_long_train": "unsupported"}, seen))
    assert not cert.passed and cert.recorded == ["m1", "m2", "m3", "m4"] and len(seen) == 5
    m = json.loads((engine / "manifest.json").read_text())
    assert "m5_long_train" not in m["gates"] and "m6_checkpoint" not in m["gates"]


def test_nothing_accepted_writes_nothing(engine: Path, tmp_path: Path) -> None:
    spec = with_overrides(load_spec(SPEC), engine_path=str(engine))
    before = (engine / "manifest.json").read_text()
    cert = certify(spec, SPEC, engine, out_dir=tmp_path / "reports", gate_fn=fake_gates({"m1_forward": "failed"}, []))
    assert cert.recorded == [] and not cert.passed
    assert (engine / "manifest.json").read_text() == before and not (engine / "forge").exists()


@pytest.mark.parametrize("sub, args, message", [("", ["--stage", "m9"], "unknown stage(s) m9"),
                                                ("", ["--rev", "no-such-rev"], "unknown revision 'no-such-rev'"),
                                                ("src", [], "is not an engine folder")])
def test_certify_cli_refuses_bad_arguments(engine: Path, sub: str, args: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["certify", "--spec", str(SPEC), "--engine", str(engine / sub), *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split())
    assert json.loads((engine / "manifest.json").read_text())["gates"] == {}
