"""`bench --op-table` of this engine on the CPU (tiny preset): every op the model calls has a row with its calls
per step (fused ops in place of their parts), the numbers are real, and the profile's categories fit in the
profiled step. The shared part (failing rows, kernel categories) is tested in core_train_engine_0_5b/."""

from __future__ import annotations

import json
import math

import pytest
import torch

from train_engine_0_5b.core.op_table import CATEGORIES, NAME_CHARS, TOP_KERNELS, microbench
from train_engine_0_5b.model_config import preset
from train_engine_0_5b.op_table import calls_per_step, ops_of_step
from train_engine_0_5b.ops.registry import OpSelection, resolve

OPS_IN_A_STEP = ["rms_norm", "gemm.qkv", "rope", "attention", "gemm.attn_out", "add_rms_norm", "gemm.fc1", "swiglu",
                 "gemm.fc2", "gemm.output", "cross_entropy", "adamw"]  # fmt: skip


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_op_table(cli, tmp_path):
    """Through the CLI, with a mix of implementations: sdpa attention, concat GEMMs, foreach AdamW."""
    res = cli(["bench", "--model", "tiny", "--device", "cpu", "--seq-length", "32", "--micro-batch-size", "2",
               "--grad-accum", "2", "--steps", "2", "--warmup", "1", "--ops", "attention=sdpa,gemm=concat,adamw=foreach",
               "--op-table", "--json", tmp_path / "b.json"])  # fmt: skip
    assert res.exit_code == 0, res.output + res.stderr
    r = json.loads((tmp_path / "b.json").read_text())
    assert json.loads(res.stdout) == r  # stdout stays one JSON document; the tables go to stderr
    assert "ops alone" in res.stderr and "top kernels" in res.stderr
    assert {"tokens_per_s", "step_time_s", "mfu", "peak_mem_gib", "config", "op_table"} <= set(r)
    table = r["op_table"]
    rows = {row["op"]: row for row in table["ops"]}
    assert list(rows) == OPS_IN_A_STEP
    L, ga = preset("tiny").num_layers, 2
    expected = {"rms_norm": ga, "add_rms_norm": 2 * L * ga, "attention": L * ga, "rope": L * ga, "swiglu": L * ga,
                "gemm.qkv": L * ga, "gemm.attn_out": L * ga, "gemm.fc1": L * ga, "gemm.fc2": L * ga, "gemm.output": ga,
                "cross_entropy": ga, "adamw": 1}  # fmt: skip
    assert {op: row["calls_per_step"] for op, row in rows.items()} == expected
    assert rows["attention"]["impl"] == "sdpa" and rows["gemm.fc1"]["impl"] == "concat" and rows["adamw"]["impl"] == "foreach"
    assert rows["rope"]["impl"] == "reference" and rows["rope"]["speedup"] == 1.0
    for row in table["ops"]:
        assert row["error"] is None and row["reference_error"] is None, row
        assert all(_finite_positive(row[k]) for k in ("ms_per_call", "ms_per_step", "reference_ms_per_step", "speedup")), row
        assert math.isclose(row["ms_per_step"], row["ms_per_call"] * row["calls_per_step"])
        assert math.isclose(row["speedup"], row["reference_ms_per_step"] / row["ms_per_step"])
    assert math.isclose(table["total_ms_per_step"], sum(row["ms_per_step"] for row in table["ops"]))
    assert table["shapes"]["tokens"] == 64 and table["shapes"]["vocab"] == 4096 and table["shapes"]["grad_accum"] == 2
    assert table["shapes"]["parameters"] == preset("tiny").num_params()

    prof = table["profile"]
    assert prof["activity"] == "cpu" and prof["steps"] == 2 and _finite_positive(prof["step_time_ms"])
    assert list(prof["categories"]) == list(CATEGORIES)
    total = sum(c["ms_per_step"] for c in prof["categories"].values())
    assert 0 < total <= prof["step_time_ms"] * 1.02 + 0.5  # exclusive op times fit in the step's wall time
    assert math.isclose(total, prof["kernel_ms_per_step"])
    assert prof["categories"]["gemm"]["ms_per_step"] > 0  # aten::mm
    top = prof["top_kernels"]
    assert 0 < len(top) <= TOP_KERNELS and [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True)
    assert all(k["count"] >= 1 and len(k["name"]) <= NAME_CHARS and k["category"] in CATEGORIES for k in top)


def test_bench_without_the_flag_has_no_op_table(cli, tmp_path):
    res = cli(["bench", "--model", "tiny", "--device", "cpu", "--seq-length", "16", "--micro-batch-size", "1",
               "--steps", "1", "--warmup", "0", "--json", tmp_path / "b.json"])  # fmt: skip
    assert res.exit_code == 0, res.output + res.stderr
    assert "op_table" not in json.loads((tmp_path / "b.json").read_text()) and "ops alone" not in res.stderr


def _tiny_rows(ops, grad_accum: int) -> list[dict]:
    """microbench's rows for the tiny model on the CPU in fp32: 1 x 8 tokens per micro batch, one timed rep."""
    cfg = preset("tiny")
    shapes = [(cfg.vocab_size, cfg.hidden_size), (cfg.hidden_size,)]
    return microbench(cfg, ops_of_step(ops, cfg.num_layers, grad_accum), micro_batch_size=1, seq_length=8,
                      dtype=torch.float32, device=torch.device("cpu"), param_shapes=shapes, warmup=1, reps=1)


def test_a_fused_mlp_is_one_row_in_place_of_its_parts():
    cfg = preset("tiny")
    rows = _tiny_rows(resolve(OpSelection(mlp="reference"), "cpu"), grad_accum=2)
    assert [r["op"] for r in rows] == [op for op in OPS_IN_A_STEP if op not in ("gemm.fc1", "swiglu", "gemm.fc2")
                                       ][:6] + ["mlp", "gemm.output", "cross_entropy", "adamw"]
    mlp = next(r for r in rows if r["op"] == "mlp")
    assert mlp["impl"] == "reference" and mlp["calls_per_step"] == 2 * cfg.num_layers and _finite_positive(mlp["ms_per_step"])


def test_a_fused_qkv_rope_is_one_row_in_place_of_its_parts():
    cfg = preset("tiny")
    rows = _tiny_rows(resolve(OpSelection(qkv_rope="reference"), "cpu"), grad_accum=2)
    assert [r["op"] for r in rows][:3] == ["rms_norm", "qkv_rope", "attention"]
    assert not {"gemm.qkv", "rope"} & {r["op"] for r in rows}
    row = next(r for r in rows if r["op"] == "qkv_rope")
    assert row["impl"] == "reference" and row["calls_per_step"] == 2 * cfg.num_layers and row["error"] is None
    assert _finite_positive(row["ms_per_step"])


def test_calls_per_step():
    calls = calls_per_step(num_layers=24, grad_accum=3)
    assert list(calls) == OPS_IN_A_STEP
    assert calls["add_rms_norm"] == 2 * 24 * 3 and calls["gemm.qkv"] == 24 * 3 and calls["rms_norm"] == 3
    assert calls["gemm.output"] == calls["cross_entropy"] == 3 and calls["adamw"] == 1
    fused = calls_per_step(num_layers=24, grad_accum=3, fused_qkv=True)
    assert fused["qkv_rope"] == 24 * 3 and "gemm.qkv" not in fused and "rope" not in fused
