"""`bench` on the CPU: the JSON the benchmark driver reads, with MFU by DESIGN.md's formula."""

from __future__ import annotations

import json
import statistics

import pytest

from train_engine_0_5b.model_config import preset


def test_bench_json(cli, tmp_path):
    res = cli(["bench", "--model", "tiny", "--device", "cpu", "--seq-length", "32", "--micro-batch-size", "2",
               "--grad-accum", "2", "--steps", "2", "--warmup", "1", "--json", tmp_path / "b.json"])
    assert res.exit_code == 0, res.output + res.stderr
    r = json.loads((tmp_path / "b.json").read_text())
    assert {"tokens_per_s", "step_time_s", "mfu", "peak_mem_gib", "device", "torch", "config"} <= set(r)
    assert len(r["step_times_s"]) == 2 and r["step_time_s"] == statistics.median(r["step_times_s"])
    tokens = 2 * 2 * 32
    assert abs(r["tokens_per_s"] - tokens / r["step_time_s"]) < 1e-6 * r["tokens_per_s"]
    assert r["mfu"] is None  # no CPU peak given: a GPU's would make the figure meaningless
    assert r["config"]["global_batch_size"] == 4 and r["config"]["dtype"] == "float32"
    assert r["config"]["cuda_graph"] is False  # bench's default: only where cuda_graph.check passes (CUDA)
    assert r["config"]["tuned_key"]["device"] == "cpu" and isinstance(r["config"]["tuned"], dict)  # what ran, recorded


def test_bench_mfu_on_the_cpu_uses_the_peak_it_is_given(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_ENGINE_PEAK_TFLOPS", "0.5")
    res = cli(["bench", "--model", "tiny", "--device", "cpu", "--seq-length", "32", "--micro-batch-size", "2",
               "--steps", "1", "--warmup", "1", "--json", tmp_path / "b.json"])
    assert res.exit_code == 0, res.output + res.stderr
    r = json.loads((tmp_path / "b.json").read_text())
    flops = preset("tiny").flops_per_token(32) * 2 * 32
    assert r["mfu"] == pytest.approx(flops / (r["step_time_s"] * 0.5e12), rel=1e-9)
