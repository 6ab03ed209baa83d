"""`python -m train_engine_8b bench` (the core's bench over this engine's Trainer) on the reduced 8B, float32 on
the CPU: the result JSON of one process (TP=1) and, slow, of two gloo ranks at TP=2 (one replica, its
vocab-parallel cross-entropy); `--op-table` (the core's, over op_table.step_ops); refusals as one line. Timing itself is not checked here: a bench figure is the
engine's own clock, the gates time `pretrain` (M5)."""

from __future__ import annotations

import json
import sys

import pytest

from test_8b_cli import engine

BENCH = ["bench", "--model", "minicpm4-8b-reduced", "--device", "cpu", "--seq-length", "32", "--micro-batch-size", "2",
         "--steps", "2", "--warmup", "1"]


def _result(res) -> dict:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout)


def test_bench_one_process(tmp_path):
    out = _result(engine(1, [*BENCH, "--grad-accum", "2", "--json", tmp_path / "b.json"], tmp_path))
    assert json.loads((tmp_path / "b.json").read_text()) == out
    c = out["config"]
    assert (c["model"], c["seq_length"], c["micro_batch_size"], c["grad_accum"], c["global_batch_size"], c["tp"],
            c["steps"], c["warmup"], c["dtype"], c["cuda_graph"]) == ("minicpm4-8b-reduced", 32, 2, 2, 4, 1, 2, 1,
                                                                      "float32", False)
    assert c["ops"]["cross_entropy"] == "torch" and c["ops"]["adamw"]
    assert len(out["step_times_s"]) == 2 and all(t > 0 for t in out["step_times_s"])
    assert out["tokens_per_s"] == pytest.approx(4 * 32 / out["step_time_s"])
    assert out["mfu"] is None and out["world_size"] == 1  # no CPU peak: no MFU


@pytest.mark.parametrize("args, message", [
    (["--op-table", "--tp", "2"], "--op-table times each op at one GPU's whole-model shapes: run it at --tp 1"),
    pytest.param(["--tp", "3"], "--tp 3 does not divide the world size (1 ranks)", marks=pytest.mark.slow),
    pytest.param(["--cuda-graph", "--warmup", "1"], "--cuda-graph needs --warmup >= 2", marks=pytest.mark.slow),
])
def test_bench_refusals_are_one_line(tmp_path, args, message):
    res = engine(1, [*BENCH, *args], tmp_path)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("ops, rows", [
    ("", {"attention": 2 * 2, "adamw": 1}),  # the CPU's defaults: the plain output layer and MLP, no registry op
    ("linear_cross_entropy=reference,mlp=reference", {"attention": 2 * 2, "mlp": 2 * 2, "linear_cross_entropy": 2,
                                                      "adamw": 1}),
])
def test_bench_op_table_rows_are_the_registry_ops_the_model_runs(tmp_path, ops, rows):
    """2 layers x grad accum 2: each op the model calls through the registry, with its calls per step, timed alone
    and against its reference; the projections, norms and RoPE are plain modules, in the profile only."""
    out = _result(engine(1, [*BENCH, "--grad-accum", "2", "--ops", ops, "--op-table"], tmp_path))
    table = out["op_table"]
    assert {r["op"]: r["calls_per_step"] for r in table["ops"]} == rows
    assert list(rows) == [r["op"] for r in table["ops"]]  # the order the model calls them
    for r in table["ops"]:
        assert r["error"] is None and r["ms_per_call"] > 0 and r["speedup"] is not None, r
    assert table["shapes"]["head_dim"] == 128 and table["shapes"]["kv_heads"] == 2 and table["shapes"]["layers"] == 2
    assert table["profile"]["categories"]["gemm"]["ms_per_step"] > 0


def test_bench_needs_a_timed_step():
    from train_engine_8b.core import bench
    from train_engine_8b.core.errors import EngineError
    from train_engine_8b.model_config import preset
    from train_engine_8b.ops.registry import OpSelection

    for steps, warmup in ((0, 3), (2, -1)):
        with pytest.raises(EngineError, match="bench needs --steps >= 1 and --warmup >= 0"):
            bench.config(preset("minicpm4-8b-reduced"), OpSelection.parse(""), seq_length=32, micro_batch_size=2,
                         grad_accum=1, steps=steps, warmup=warmup, data_parallel=1)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun over gloo")
def test_bench_tp2(tmp_path):
    out = _result(engine(2, [*BENCH, "--tp", "2"], tmp_path))
    c = out["config"]
    assert (out["world_size"], c["tp"], c["global_batch_size"], c["ops"]["cross_entropy"]) == (2, 2, 2, "vocab_parallel")
    assert out["tokens_per_s"] == pytest.approx(2 * 32 / out["step_time_s"])
