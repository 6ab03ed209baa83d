"""The benchmark driver: the CPU smoke run writes a well-formed report; out of memory is a recorded result
(with the micro-batch fallback); engines are found and run through their `bench` contract; the `bench`
verb hands its arguments to the driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare, report
from benchmarks.stacks import Stack, discover_engines, resolve
from gates.model_config import preset

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


def _results_files() -> set[Path]:
    return set((REPO / "benchmarks" / "results").rglob("*"))


def test_cpu_smoke_run_writes_a_well_formed_report(tmp_path) -> None:
    """Reference stacks and the shipped engine on tiny shapes, progress on stderr, nothing under benchmarks/results."""
    out = tmp_path / "smoke"
    before = _results_files()
    r = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--smoke", "--out", str(out)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _results_files() == before
    assert "[compare] engine:train_engine_0.5B micro batch 2: running" in r.stderr
    engine = next(row for row in json.loads((out / "compare.json").read_text())["results"] if row["stack"].startswith("engine:"))
    assert engine["status"] == "ok" and engine["tokens_per_s"] > 0, engine
    assert "bench: tiny on cpu" in (out / engine["log"]).read_text()
    doc = json.loads((out / "compare.json").read_text())
    assert doc["settings"]["model"] == "tiny" and doc["settings"]["device"] == "cpu"
    assert {"torch", "megatron_core", "triton"} <= set(doc["versions"]) and doc["git_commit"]
    flops = preset("tiny").flops_per_token(64)
    assert doc["settings"]["flops_per_token"] == flops
    rows = {row["stack"]: row for row in doc["results"] if not row["stack"].startswith("engine:")}
    assert list(rows) == ["torch-eager", "torch-compile"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert len(row["step_times_s"]) == 3 and all(t > 0 for t in row["step_times_s"])
        assert row["step_time_s"] == pytest.approx(sum(row["step_times_s"][1:]) / 2)  # median of 2 measured steps
        assert row["tokens_per_s"] == pytest.approx(2 * 64 / row["step_time_s"])
        assert row["mfu"] is None  # a CPU without --cpu-peak-tflops: no MFU against a GPU's peak
        assert all(x == x for x in row["losses"])  # finite, not NaN
    assert rows["torch-compile"]["vs"]["torch-compile"] == pytest.approx(1.0)
    assert rows["torch-eager"]["vs"]["torch-compile"] == pytest.approx(rows["torch-eager"]["tokens_per_s"] / rows["torch-compile"]["tokens_per_s"])
    md = (out / "compare.md").read_text()
    assert "| stack | micro batch | status | tokens/s |" in md and "| torch-compile | 2 | ok |" in md


def test_out_of_memory_is_a_result_and_halves_the_micro_batch(tmp_path) -> None:
    script = "import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 9 GiB'); sys.exit(1)"
    stack = Stack("fake", "torch", [sys.executable, "-c", script])
    args = compare.parse_args(["--model", "tiny", "--seq-length", "16", "--timeout", "60"])
    row = compare.run_stack(stack, args, 8, tmp_path, preset("tiny").flops_per_token(16))
    assert row["status"] == "oom"
    assert [a["micro_batch_size"] for a in row["attempts"]] == [8, 4, 2, 1]
    assert all(a["status"] == "oom" for a in row["attempts"])
    args = compare.parse_args(["--model", "tiny", "--no-oom-fallback"])
    assert len(compare.run_stack(stack, args, 8, tmp_path, 1.0)["attempts"]) == 1


def _fake_engine(root: Path, name: str, model: str | None, with_main: bool = True) -> Path:
    pkg = root / name / "src" / name.replace("-", "_")
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if with_main:  # a stand-in engine obeying the bench contract of exports/README.md
        (pkg / "__main__.py").write_text(
            "import json, sys\n"
            "a = sys.argv[1:]\n"
            "assert a[0] == 'bench'\n"
            "opt = dict(zip(a[1::2], a[2::2]))\n"
            "mb, s = int(opt['--micro-batch-size']), int(opt['--seq-length'])\n"
            "json.dump({'tokens_per_s': mb * s / 0.5, 'step_time_s': 0.5, 'mfu': 0.123, 'peak_mem_gib': 1.5,\n"
            "           'device': 'fake', 'torch': 'x'}, open(opt['--json'], 'w'))\n")
    if model is not None:
        (root / name / "model_spec.toml").write_text(f'[model]\npreset = "{model}"\n')
    return root / name


def test_engines_are_discovered_and_run_through_their_bench_contract(tmp_path) -> None:
    exports = tmp_path / "exports"
    _fake_engine(exports, "good", "minicpm4-0.5b")
    _fake_engine(exports, "other", "minicpm4-8b")
    _fake_engine(exports, "nocli", None, with_main=False)
    stacks = {s.name: s for s in discover_engines(exports, "minicpm4-0.5b")}
    assert stacks["engine:nocli"].argv is None and "no CLI" in stacks["engine:nocli"].skip_reason
    assert stacks["engine:other"].argv is None and "minicpm4-8b" in stacks["engine:other"].skip_reason
    assert {s.name: s for s in discover_engines(exports, "tiny")}["engine:other"].argv is not None  # tiny: any engine
    good = stacks["engine:good"]
    assert good.engine_contract and good.argv[-2:] == ["good", "bench"]
    args = compare.parse_args(["--model", "tiny", "--seq-length", "32", "--steps", "2"])
    flops = preset("tiny").flops_per_token(32)
    assert compare.command(good, args, 4, tmp_path / "r.json")[-6:] == ["--model", "tiny", "--device", "cuda", "--warmup", "3"]
    row = compare.run_stack(good, args, 4, tmp_path / "out", flops)
    assert row["status"] == "ok" and row["tokens_per_s"] == 4 * 32 / 0.5
    assert row["reported_mfu"] == 0.123 and row["mfu"] == pytest.approx(row["tokens_per_s"] * flops / 989.4e12)
    on_own = compare.parse_args(["--model", "minicpm4-0.5b", "--seq-length", "32", "--steps", "2"])
    assert "--model" not in compare.command(good, on_own, 4, tmp_path / "raw" / "r.json")  # its own model: no --model


def test_an_engine_without_a_model_spec_benches_the_compared_model(tmp_path) -> None:
    """An engine for several models (no model_spec.toml: the 8B's) gets the compared model as a config.json."""
    import json

    from gates.model_config import from_hf_config

    engine = {s.name: s for s in discover_engines(_fake_engine(tmp_path / "exports", "many", None).parent,
                                                   "minicpm4-8b-8l")}["engine:many"]
    args = compare.parse_args(["--model", "minicpm4-8b-8l", "--seq-length", "32", "--steps", "2"])
    cmd = compare.command(engine, args, 2, tmp_path / "raw" / "r.json")
    assert cmd[-2] == "--model" and Path(cmd[-1]) == tmp_path / "models" / "minicpm4-8b-8l" / "config.json"
    assert not Path(cmd[-1]).exists()  # a plan (--dry-run) writes nothing; the run writes it
    compare.run_attempt(engine, args, 2, tmp_path, 120)
    cfg, _ = from_hf_config(cmd[-1])
    assert (cfg.num_layers, cfg.hidden_size, cfg.head_dim) == (8, 4096, 128) and json.loads(Path(cmd[-1]).read_text())


def test_an_engine_without_a_cli_is_skipped(tmp_path) -> None:
    exports = tmp_path / "exports"
    _fake_engine(exports, "nocli", None, with_main=False)
    stacks = {s.name: s for s in discover_engines(exports, "tiny")}
    args = compare.parse_args(["--model", "tiny", "--seq-length", "32", "--steps", "2"])
    flops = preset("tiny").flops_per_token(32)
    skipped = compare.run_stack(stacks["engine:nocli"], args, 4, tmp_path / "out", flops)
    assert skipped["status"] == "skipped" and skipped["attempts"] == []
    with pytest.raises(ValueError):
        resolve(["no-such-stack"], "tiny", exports)


def test_dry_run_plan_and_megatron_default_micro_batch() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--dry-run", "--micro-batch-size", "8"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = {p["stack"]: p for p in json.loads(r.stdout)["plan"]}
    assert plan["megatron"]["micro_batch_size"] == 1 and plan["megatron-sdpa"]["micro_batch_size"] == 8
    assert plan["torchtitan"]["command"] is None and "torchtitan" in plan["torchtitan"]["skip_reason"]
    assert "--seq-length" in plan["torch-compile"]["command"]


def test_bench_verb_runs_the_driver() -> None:
    r = subprocess.run(["bash", "agent-loop.sh", "bench", "--dry-run", "--stacks", "torch-eager", "--seq-length", "128"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["seq_length"] == 128 and [p["stack"] for p in doc["plan"]] == ["torch-eager"]


def test_record_copies_into_the_results_folder_and_its_index(tmp_path) -> None:
    """--record writes <stem>.json|md and an index entry; a second run the same day gets <stem>-2; a device the
    index does not know leaves no file behind."""
    from benchmarks import results_index

    (tmp_path / results_index.INDEX_FILE).write_text("")
    doc = json.dumps({"git_commit": "a" * 40, "settings": {"model": "tiny"}, "results": []})
    first = compare.record(tmp_path, "2026-12-03-cpu-tiny", doc, "# md\n", what="smoke")
    second = compare.record(tmp_path, "2026-12-03-cpu-tiny", doc, "# md\n", what="smoke")
    assert [p.name for p in first + second] == ["2026-12-03-cpu-tiny.json", "2026-12-03-cpu-tiny.md",
                                                "2026-12-03-cpu-tiny-2.json", "2026-12-03-cpu-tiny-2.md"]
    assert [e.id for e in results_index.load(tmp_path)] == ["2026-12-03-cpu-tiny", "2026-12-03-cpu-tiny-2"]
    assert results_index.problems(tmp_path) == []
    with pytest.raises(ValueError, match="refused"):
        compare.record(tmp_path, "2026-12-03-a100-tiny", doc, "# md\n", what="smoke")
    assert not list(tmp_path.glob("*a100*"))
    assert not compare.parse_args([]).record and compare.parse_args(["--results-dir", str(tmp_path)]).record


def test_commit_note_says_where_the_commit_came_from() -> None:
    assert report.commit_note({"git_commit": "a" * 40, "git_dirty": False}) == "commit aaaaaaaaaaaa"
    assert report.commit_note({"git_commit": "a" * 40, "git_dirty": True}) == "commit aaaaaaaaaaaa (dirty)"
    assert report.commit_note({"git_commit": "a" * 40, "git_dirty": None}).endswith("(given by the caller)")


@pytest.mark.slow
def test_an_engine_gets_a_gate_timed_row_beside_its_own_bench(tmp_path) -> None:
    """The gate-timed row runs the engine's `pretrain` through M5's speed part: tokens/s from the gate's clock,
    the engine's own claims ignored; without a peak for the device the row says unsupported, never a figure."""
    from benchmarks.gate_timed import gate_timed_row

    base = REPO / "tests" / "redteam" / "engines" / "base"
    stack = Stack("engine:base", "engine", [sys.executable, "-m", "rt_base", "bench"], engine_contract=True, engine_dir=base)
    # 200 timed steps (~1-2 s of work, tests/redteam/conftest.py CPU_SPEED): fewer drown in start-up noise
    args = compare.parse_args(["--model", "tiny", "--seq-length", "16", "--steps", "200", "--device", "cpu",
                               "--global-batch-size", "2", "--cpu-peak-tflops", "0.01", "--timeout", "300"])
    row = gate_timed_row(stack, args, 2, tmp_path, None)
    n = row["gate"]["numbers"]
    assert row["status"] == "ok", row.get("message")
    assert row["tokens_per_s"] == pytest.approx(200 * 2 * 16 / n["timed_window_s"])
    assert (row["global_batch_size"], n["micro_batch_size"], n["seq_length"]) == (2, 2, 16)
    assert n["loss_mean_rel_diff"] < 1e-2 and row["source"] == "gate"
    no_peak = gate_timed_row(stack, compare.parse_args(["--model", "tiny", "--device", "cpu"]), 2, tmp_path / "b", None)
    assert no_peak["status"] == "unsupported" and "tokens_per_s" not in no_peak and "GPU only" in no_peak["message"]


def test_mfu_needs_the_devices_peak() -> None:
    """The GPU's peak on cuda; on a CPU only the peak given, else no figure (never CPU work over an H100's peak)."""
    import argparse

    assert compare.row_mfu(1e5, 1e9, argparse.Namespace(device="cuda", cpu_peak_tflops=None)) == pytest.approx(1e14 / 989.4e12)
    assert compare.row_mfu(100.0, 1e9, argparse.Namespace(device="cpu", cpu_peak_tflops=None)) is None
    assert compare.row_mfu(100.0, 1e9, argparse.Namespace(device="cpu", cpu_peak_tflops=0.5)) == pytest.approx(1e11 / 0.5e12)
