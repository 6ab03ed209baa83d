"""`bench --op-table` on the CPU (tiny preset): every op the model calls has a row with its calls per
step, the numbers are real, a failing op is a row with its error, the profile's categories fit in the
profiled step, and kernel names land in the right category."""

from __future__ import annotations

import json
import math

import pytest
import torch

from train_engine_0_5b.model_config import preset
from train_engine_0_5b.op_table import CATEGORIES, NAME_CHARS, TOP_KERNELS, breakdown, calls_per_step, classify, microbench
from train_engine_0_5b.ops.registry import OPS, OpSelection, resolve

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
    return microbench(cfg, ops, micro_batch_size=1, seq_length=8, grad_accum=grad_accum, dtype=torch.float32,
                      device=torch.device("cpu"), param_shapes=shapes, warmup=1, reps=1)


def test_a_failing_op_is_a_row_with_its_error(monkeypatch):
    """A broken selected implementation, and a reference that runs out of memory: errors in the rows,
    every other op still timed."""

    def broken(*args, **kwargs):
        raise ValueError("no kernel for this shape")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setitem(OPS["rope"], "broken", broken)
    monkeypatch.setitem(OPS["swiglu"], "plain", OPS["swiglu"]["reference"])
    ops = resolve(OpSelection.parse("rope=broken,swiglu=plain"), "cpu")
    monkeypatch.setitem(OPS["swiglu"], "reference", out_of_memory)
    rows = {r["op"]: r for r in _tiny_rows(ops, grad_accum=1)}
    assert rows["rope"]["error"] == "ValueError: no kernel for this shape" and rows["rope"]["ms_per_step"] is None
    assert rows["rope"]["reference_error"] is None and _finite_positive(rows["rope"]["reference_ms_per_step"])
    assert rows["rope"]["speedup"] is None
    assert rows["swiglu"]["reference_error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert _finite_positive(rows["swiglu"]["ms_per_step"]) and rows["swiglu"]["speedup"] is None
    assert all(_finite_positive(r["ms_per_step"]) for op, r in rows.items() if op != "rope")


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


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8::Params)", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, false>", "gemm"),
    ("aten::mm", "gemm"),
    ("kernel_cutlass_kernel_quackepiloguefrontendGemmMod_linear_act_epi_ee8d483c9adb3cd3_g_none_sm9_object_at__Tiled", "gemm"),
    ("kernel_cutlass_kernel_quackgemm_default_epiGemmDefaultSm90_object_at__TiledMMA_ThrLayoutVMNK12811110", "gemm"),
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at__tensor0000o1", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t>>", "attention"),
    ("flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton"),
    ("triton_poi_fused_cat_1", "triton"),
    ("_rmsnorm_fwd_kernel", "triton"),
    ("_ce_bwd_kernel", "triton"),
    ("_adamw_kernel", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda>>", "other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul>>", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("aten::add_", "other"),
])  # fmt: skip
def test_classify(name, category):
    assert classify(name) == category


def test_breakdown_groups_and_ranks_kernels():
    long_name = "triton_red_fused_" + "x" * 200
    kernels = [("nvjet_a", 3000.0), ("nvjet_a", 1000.0), ("flash_fwd_kernel", 2000.0), (long_name, 500.0),
               ("ncclDevKernel_AllReduce", 800.0), ("elementwise_kernel", 100.0)] + [(f"k{i}", 1.0) for i in range(40)]
    prof = breakdown(kernels, steps=2, step_time_ms=10.0, activity="cuda")
    cats = prof["categories"]
    assert cats["gemm"]["ms_per_step"] == 2.0 and cats["attention"]["ms_per_step"] == 1.0
    assert cats["triton"]["ms_per_step"] == 0.25 and cats["communication"]["ms_per_step"] == 0.4
    assert math.isclose(cats["other"]["ms_per_step"], 0.05 + 0.02) and cats["optimizer"]["ms_per_step"] == 0.0
    assert cats["gemm"]["share"] == 0.2 and math.isclose(prof["kernel_ms_per_step"], 3.72)
    top = prof["top_kernels"]
    assert len(top) == TOP_KERNELS and top[0] == {"name": "nvjet_a", "category": "gemm", "count": 2, "ms": 4.0, "ms_per_step": 2.0}
    assert top[3]["name"] == long_name[:NAME_CHARS] and top[3]["category"] == "triton"
