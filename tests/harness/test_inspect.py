"""`inspect`: identity, the gates manifest.json records (an accepted unsupported part never reads as a bare
`passed`), the history of the run that wrote the manifest only, figures labelled with their hardware, eval loss
beside train loss, and folders that are not engines refused without writing anything. No engine code is run
(--no-ops)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from gates.report import GateReport
from harness.cli import app
from harness.inspection import benchmark_rows, collect
from harness.inspection_report import markdown, mfu_bars, plot

M5_WHY = "MFU is measured on GPU only (peak 989.4 TFLOP/s bf16); this run is on cpu"


def _engine(tmp_path: Path) -> Path:
    eng = tmp_path / "exports/eng"
    (eng / "forge").mkdir(parents=True)
    (eng / "src/eng_pkg").mkdir(parents=True)
    (eng / "src/eng_pkg/__main__.py").write_text("")
    (eng / "model_spec.toml").write_text('[model]\nname = "tiny"\nhidden_size = 64\n\n[engine]\npackage = "eng_pkg"\n'
                                         '\n[ops]\nattention = "sdpa"\nrms_norm = "triton_fused"\n')
    cpu = {"cpu": "x86_64", "gpu": None, "gpus": []}
    (eng / "manifest.json").write_text(json.dumps({"engine": "eng", "commit": "abc1234567", "spec": {"name": "tiny-cpu"},
        "forge": {"run_id": "r"},
        "gates": {"m1_forward": {"verdict": "passed", "metrics": {"worst_rel": 1.5e-7}, "commit": "abc1234567", "hardware": cpu},
                  "m5_long_train": {"verdict": "unsupported", "metrics": {"loss.window_mean_rel_diff": 1e-3},
                                    "commit": "abc1234567", "hardware": cpu, "unsupported": {"mfu": M5_WHY}}}}))
    (eng / "forge/ledger.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"kind": "event", "event": "run_started", "run_id": "r"},
        {"kind": "round", "run_id": "old", "stage": "m1", "round": 1, "backend": "claude_code", "verdict": "failed", "ts": 0},
        {"kind": "round", "run_id": "r", "stage": "m1", "round": 1, "backend": "replay", "verdict": "failed",
         "tokens_in": 0, "tokens_out": 0, "cost_usd": 0, "wall_s": 12.5, "ts": 1},
        {"kind": "round", "run_id": "r", "stage": "m1", "round": 2, "backend": "replay", "verdict": "passed",
         "commit": "abc1234567", "wall_s": 10.0, "ts": 2},
        {"kind": "round", "run_id": "r", "stage": "m5", "round": 1, "backend": "replay", "verdict": "passed",
         "gates": [{"name": "m5_long_train", "verdict": "unsupported"}], "commit": "abc1234567", "wall_s": 10.0, "ts": 3},
    ]) + "\n{torn")
    results = tmp_path / "benchmarks/results"  # committed results of other machines: not this engine's proof
    (results / "gates/2026-01-01-h100-run/eng").mkdir(parents=True)
    (results / "a.json").write_text(json.dumps({"results": [{"stack": "h100-stack", "tokens_per_s": 1.0, "mfu": 0.5}]}))
    (results / "gates/2026-01-01-h100-run/eng/m2_backward.json").write_text(GateReport(gate="m2_backward", verdict="passed").model_dump_json())
    log = tmp_path / "train/log.jsonl"
    log.parent.mkdir()
    log.write_text("\n".join([json.dumps({"step": i, "loss": 10 - i * 0.1, "mfu": 1e-6}) for i in range(1, 30)]
                             + [json.dumps({"step": i, "eval_loss": 9.5 - i * 0.05, "eval_ppl": 2.0}) for i in (10, 20)]))
    (log.parent / "summary.json").write_text(json.dumps({"device": "cpu"}))
    return eng


def test_collect_shows_the_manifests_run_and_labels_hardware(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    ins = collect(eng, logs=[tmp_path / "train/log.jsonl"], probe_ops=False)
    assert ins.ops == [{"op": "attention", "selected": "sdpa"}, {"op": "rms_norm", "selected": "triton_fused"}]
    assert [(r["run_id"], r["verdict"]) for r in ins.rounds] == [("r", "failed"), ("r", "passed"), ("r", "passed")]
    assert ins.benchmarks == []
    assert {g["gate"]: (g["verdict"], g["hardware"]) for g in ins.gates} == {
        "m1_forward": ("passed", "CPU (x86_64)"), "m5_long_train": ("passed (mfu unsupported)", "CPU (x86_64)")}
    (t,) = ins.train_logs
    assert (t.device, len(t.steps), [e["step"] for e in t.evals]) == ("cpu", 29, [10, 20])
    md = markdown(ins)
    assert "| m5 | 1 | replay | passed (m5_long_train unsupported) |" in md and "claude_code" not in md
    assert f"- m5_long_train mfu unsupported: {M5_WHY}" in md and "h100" not in md.lower()
    texts = plot(ins, tmp_path / "p.png")
    assert "loss (cpu)" in texts and "eval loss, log.jsonl (cpu)" in texts and "train loss, log.jsonl (cpu)" in texts
    assert "MFU" in texts  # nothing measured: the panel says so, no unlabelled bar


def test_the_engines_target_hardware_is_labelled_as_its_target(tmp_path: Path) -> None:
    """model_spec.toml's [engine] hardware (what the engine is built for) never reads as where it was proven."""
    eng = _engine(tmp_path)
    spec = eng / "model_spec.toml"
    spec.write_text(spec.read_text().replace('package = "eng_pkg"\n', 'package = "eng_pkg"\nhardware = "nvidia-h100"\n'))
    md = markdown(collect(eng, probe_ops=False))
    (line,) = [x for x in md.splitlines() if "nvidia-h100" in x]
    assert line.startswith("built for (model_spec.toml [engine]") and "hardware: nvidia-h100" in line


def test_mfu_bars_name_their_hardware(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"hardware": {"device_name": "NVIDIA H100 80GB HBM3"},
                                 "results": [{"stack": "engine", "tokens_per_s": 1000.0, "mfu": 0.5}]}))
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"tokens_per_s": 170.0, "mfu": 1e-7, "device": "cpu"}))
    ins = collect(eng, bench=[bench, own], probe_ops=False)
    assert [b["device"] for b in ins.benchmarks] == ["NVIDIA H100 80GB HBM3", "cpu"]
    assert [label for label, _ in mfu_bars(ins)] == ["engine (NVIDIA H100 80GB HBM3)", "own (cpu)"]
    assert "engine (NVIDIA H100 80GB HBM3)" in plot(ins, tmp_path / "p.png")


def test_inspect_cli_writes_report_and_plot(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["inspect", str(eng), "--no-ops", "--out", str(out), "--log", str(tmp_path / "train/log.jsonl")])
    assert r.exit_code == 0, r.output
    assert "m1_forward" in r.output and "m5_long_train mfu unsupported: MFU is measured on GPU only" in r.output
    md = (out / "report.md").read_text()
    assert "| m5_long_train | passed (mfu unsupported) |" in md
    assert "tiny-cpu" in md and "| m1 | 2 | replay | passed |" in md and "29 steps; loss 9.9 -> 7.1" in md
    assert "eval loss at 2 steps: 9 (step 10) -> 8.5 (step 20)" in md
    png = (out / "loss_mfu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((out / "report.json").read_text())["manifest"]["commit"] == "abc1234567"


def test_a_folder_that_is_not_an_engine_is_refused_and_nothing_written(tmp_path: Path) -> None:
    for folder in (tmp_path / "docs", tmp_path / "missing"):
        (tmp_path / "docs").mkdir(exist_ok=True)
        out = tmp_path / "out"
        r = CliRunner().invoke(app, ["inspect", str(folder), "--no-ops", "--out", str(out)])
        assert r.exit_code == 2 and "nothing written" in r.output, r.output
        assert not out.exists()


def test_no_manifest_history_means_no_history(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    (eng / "manifest.json").write_text(json.dumps({"engine": "eng", "gates": {}}))
    ins = collect(eng, probe_ops=False)
    assert ins.rounds == [] and any("no gate recorded" in n for n in ins.notes)
    assert any("records no forge run" in n for n in ins.notes)


def test_benchmark_rows_ignore_bad_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("[1, 2")
    assert benchmark_rows(tmp_path / "x.json") == []


def test_a_manifest_about_other_code_says_so(tmp_path: Path) -> None:
    """Gates judged a commit; once the engine's src/ or pyproject.toml differs from it (edited, or a new file),
    inspect names the files and the certify command; docs, tests and the manifest itself do not count."""
    import git

    repo = git.Repo.init(tmp_path)
    repo.config_writer().set_value("user", "name", "t").set_value("user", "email", "t@t").release()
    eng = _engine(tmp_path)
    (eng / "pyproject.toml").write_text("[project]\nname = 'eng'\n")
    repo.git.add(A=True)
    repo.git.commit(m="engine")
    sha = repo.head.commit.hexsha
    m = json.loads((eng / "manifest.json").read_text())
    m["spec"]["path"] = "specs/tiny-cpu.toml"
    for g in m["gates"].values():
        g["commit"] = sha
    (eng / "manifest.json").write_text(json.dumps(m))
    (eng / "README.md").write_text("docs change\n")
    (eng / "tests").mkdir()
    (eng / "tests/test_x.py").write_text("")

    def drift() -> list[str]:
        return [n for n in collect(eng, probe_ops=False).notes if "changed since" in n or "cannot compare" in n]

    assert drift() == []
    (eng / "src/eng_pkg/__main__.py").write_text("print('other code')\n")
    (eng / "src/eng_pkg/new_op.py").write_text("")
    (note,) = drift()
    assert f"commit {sha[:10]}" in note and "m1_forward, m5_long_train" in note
    assert "2 file(s) (src/eng_pkg/__main__.py, src/eng_pkg/new_op.py)" in note
    assert "certify --spec specs/tiny-cpu.toml --engine" in note
    repo.git.add(A=True)
    repo.git.commit(m="new code")  # committed or not, it is not what the gates judged
    (note,) = drift()
    assert "2 file(s)" in note
    for g in m["gates"].values():
        g["commit"] = "f" * 40
    (eng / "manifest.json").write_text(json.dumps(m))
    (note,) = drift()
    assert note.startswith(f"gates judged commit {'f' * 10}, which this checkout cannot compare with")
