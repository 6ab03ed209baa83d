"""core/op_table.py, `bench --op-table`'s shared part, on the CPU with the engine's small model: each op of a
step timed alone against its reference (a failing op is a row with its error, the others still timed), the
totals, `--op-table` refused under TP, and kernel names grouped by category in the profile's breakdown."""

from __future__ import annotations

import math

import pytest
import torch

from .core_testlib import engine_import
from .engine_fixture import MODEL

CATEGORIES, NAME_CHARS, TOP_KERNELS, StepOp, breakdown, classify, microbench, table = engine_import(
    "core.op_table", "CATEGORIES", "NAME_CHARS", "TOP_KERNELS", "StepOp", "breakdown", "classify", "microbench", "table")
OPS, = engine_import("ops.registry", "OPS")
load, = engine_import("model_config", "load")


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_a_failing_op_is_a_row_with_its_error(monkeypatch):
    """A broken implementation, and a reference that runs out of memory: errors in their rows, every other number
    real, the totals None where a row has none."""

    def broken(*args, **kwargs):
        raise ValueError("no kernel for this shape")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    plain_swiglu = OPS["swiglu"]["reference"]
    monkeypatch.setitem(OPS["swiglu"], "reference", out_of_memory)
    cfg = load(MODEL)
    step = [StepOp("rope", "broken", broken, 3), StepOp("swiglu", "plain", plain_swiglu, 3),
            StepOp("adamw", "reference", OPS["adamw"]["reference"], 1)]
    shapes = dict(micro_batch_size=1, seq_length=8, dtype=torch.float32,
                  param_shapes=[(cfg.vocab_size, cfg.hidden_size), (cfg.hidden_size,)])
    rows = {r["op"]: r for r in microbench(cfg, step, device=torch.device("cpu"), warmup=1, reps=1, **shapes)}
    assert list(rows) == ["rope", "swiglu", "adamw"]
    assert rows["rope"]["error"] == "ValueError: no kernel for this shape" and rows["rope"]["ms_per_step"] is None
    assert rows["rope"]["reference_error"] is None and _finite_positive(rows["rope"]["reference_ms_per_step"])
    assert rows["rope"]["speedup"] is None and rows["rope"]["calls_per_step"] == 3
    assert rows["swiglu"]["reference_error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert _finite_positive(rows["swiglu"]["ms_per_step"]) and rows["swiglu"]["speedup"] is None
    assert math.isclose(rows["swiglu"]["ms_per_step"], 3 * rows["swiglu"]["ms_per_call"])
    assert rows["adamw"]["speedup"] == 1.0 and _finite_positive(rows["adamw"]["ms_per_step"])
    t = table(cfg, list(rows.values()), {}, grad_accum=3, **shapes)
    assert t["total_ms_per_step"] is None and t["reference_total_ms_per_step"] is None
    assert t["shapes"]["grad_accum"] == 3 and t["shapes"]["parameters"] == cfg.vocab_size * cfg.hidden_size + cfg.hidden_size


def test_op_table_is_refused_under_tensor_parallelism(cli):
    res = cli(["bench", "--model", MODEL, "--device", "cpu", "--tp", "2", "--op-table"])
    assert res.exit_code != 0
    assert "--op-table times each op at one GPU's whole-model shapes: run it at --tp 1" in res.output + res.stderr


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
