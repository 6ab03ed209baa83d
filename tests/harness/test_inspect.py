"""`inspect`: identity, gates from manifest.json, forge history, benchmark rows of any shape, and the
loss/MFU plot, from a hand-made engine folder (no engine code is run: --no-ops)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from harness.cli import app
from harness.inspection import benchmark_rows, collect, gate_report_rows


def _engine(tmp_path: Path) -> Path:
    eng = tmp_path / "exports/eng"
    (eng / "forge").mkdir(parents=True)
    (eng / "model_spec.toml").write_text('[model]\nname = "tiny"\nhidden_size = 64\n\n[engine]\npackage = "eng_pkg"\n'
                                         '\n[ops]\nattention = "sdpa"\nrms_norm = "triton_fused"\n')
    (eng / "manifest.json").write_text(json.dumps({"engine": "eng", "commit": "abc1234567", "spec": {"name": "tiny-cpu"},
        "gates": {"m1_forward": {"verdict": "passed", "metrics": {"worst_rel": 1.5e-7}, "commit": "abc1234567",
                                 "hardware": {"cpu": "x86_64"}}}}))
    (eng / "forge/ledger.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"kind": "event", "event": "run_started", "run_id": "r"},
        {"kind": "round", "run_id": "r", "stage": "m1", "round": 1, "backend": "replay", "verdict": "failed",
         "tokens_in": 0, "tokens_out": 0, "cost_usd": 0, "wall_s": 12.5, "ts": 1},
        {"kind": "round", "run_id": "r", "stage": "m1", "round": 2, "backend": "replay", "verdict": "passed",
         "commit": "abc1234567", "wall_s": 10.0, "ts": 2}]) + "\n{torn")
    bench = tmp_path / "benchmarks/results"
    bench.mkdir(parents=True)
    (bench / "a.json").write_text(json.dumps({"results": [{"stack": "engine", "tokens_per_s": 1000.0, "mfu": 0.5,
                                                           "step_time_s": 0.1, "peak_mem_gib": 30}]}))
    (bench / "b.json").write_text(json.dumps({"device": "H100", "cudnn_mb8": {"tokens_per_s": 900, "step_s": 0.2, "mfu": 0.42}}))
    (bench / "c.json").write_text("not json")
    run = bench / "gates/2026-01-01-h100-run/eng"
    run.mkdir(parents=True)
    (run / "m2_backward.json").write_text(json.dumps({"gate": "m2_backward", "verdict": "passed", "reference": "torch",
        "message": "218 gradients within bounds", "hardware": {"gpu": "NVIDIA H100"}, "case": {"source": "preset x"},
        "engine_metrics": {"engine probe backward": {"probe": "backward", "ops": {
            "attention": "flash4", "mlp": "quack_dgated", "gemm.fc1": "(in mlp=quack_dgated)", "rms_norm": "reference",
            "qkv_rope": "unfused"}}}}))
    (run / "m3_optimizer.json").write_text(json.dumps({"gate": "m3_optimizer", "verdict": "failed", "message": "weights",
                                                       "hardware": {"cpu": "x86_64"}}))
    (run / "broken.json").write_text("{")
    other = bench / "gates/2026-01-01-h100-run/other_engine"
    other.mkdir(parents=True)
    (other / "m1_forward.json").write_text(json.dumps({"gate": "m1_forward", "verdict": "passed"}))
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": i, "loss": 10 - i * 0.1, "mfu": 0.3 + i * 0.001}) for i in range(1, 30)))
    return eng


def test_collect_and_write(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    ins = collect(eng, logs=[tmp_path / "log.jsonl"], bench_dir=tmp_path / "benchmarks/results", probe_ops=False)
    assert ins.ops == [{"op": "attention", "selected": "sdpa"}, {"op": "rms_norm", "selected": "triton_fused"}]
    assert [r["verdict"] for r in ins.rounds] == ["failed", "passed"]
    assert {(b["stack"], b["tokens_per_s"]) for b in ins.benchmarks} == {("engine", 1000.0), ("cudnn_mb8", 900)}
    assert len(ins.train_logs[str(tmp_path / "log.jsonl")]) == 29


def test_inspect_cli_writes_report_and_plot(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["inspect", str(eng), "--no-ops", "--out", str(out), "--log", str(tmp_path / "log.jsonl")])
    assert r.exit_code == 0, r.output
    assert "m1_forward" in r.output and "passed" in r.output and "tiny-cpu" in (out / "report.md").read_text()
    md = (out / "report.md").read_text()
    assert "| m1 | 2 | replay | passed |" in md and "29 steps; loss 9.9 -> 7.1" in md
    png = (out / "loss_mfu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((out / "report.json").read_text())["manifest"]["commit"] == "abc1234567"


def test_committed_gate_reports_of_this_engine_only(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    rows = gate_report_rows(tmp_path / "benchmarks/results/gates", eng.name)
    assert [(r["run"], r["gate"], r["verdict"], r["hardware"]) for r in rows] == [
        ("2026-01-01-h100-run", "m2_backward", "passed", "NVIDIA H100"), ("2026-01-01-h100-run", "m3_optimizer", "failed", "x86_64")]
    ins = collect(eng, bench_dir=tmp_path / "benchmarks/results", probe_ops=False)
    assert ins.gate_reports == rows
    import git

    git.Repo.init(tmp_path)  # the CLI finds benchmarks/results from the engine's repository root
    r = CliRunner().invoke(app, ["inspect", str(eng), "--no-ops", "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| 2026-01-01-h100-run | m3_optimizer | failed |" in md and "other_engine" not in md
    # the ops the GPU report's probe ran (plain ones left out); "-" where the report records none
    assert [r["ops"] for r in rows] == ["attention=flash4, mlp=quack_dgated", "-"]
    assert "| attention=flash4, mlp=quack_dgated |" in md


def test_benchmark_rows_ignore_bad_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("[1, 2")
    assert benchmark_rows(tmp_path / "x.json") == []
