"""The driver's arithmetic: FLOPs per token (docs/DESIGN.md's formula, by hand), MFU, median, ratios."""

from __future__ import annotations

import math

import pytest

from benchmarks.compare import add_ratios, device_slug
from benchmarks.metrics import PEAK_TFLOPS_BF16, median, mfu, ratio, summarize
from gates.model_config import preset


def test_flops_per_token_0_5b_by_hand() -> None:
    # 6 * ( L * (2*h*n*d + 2*h*g*d + 3*h*f + s*n*d) + h*V ), h=1024 L=24 n=16 g=2 d=64 f=4096 V=73448 s=4096:
    # per layer 2,097,152 + 262,144 + 12,582,912 + 4,194,304 = 19,136,512; x24 = 459,276,288;
    # + h*V 75,210,752 = 534,487,040; x6 = 3,206,922,240 (MEASURED.md: 3.207 GFLOP/token)
    assert preset("minicpm4-0.5b").flops_per_token(4096) == 3_206_922_240
    assert round(preset("minicpm4-0.5b").flops_per_token(4096) / 1e9, 3) == 3.207


def test_flops_per_token_8b_by_hand() -> None:
    # h=4096 L=32 n=32 g=2 d=128 f=16384 V=73448 s=4096:
    # per layer 33,554,432 + 2,097,152 + 201,326,592 + 16,777,216 = 253,755,392; x32 = 8,120,172,544;
    # + h*V 300,843,008 = 8,421,015,552; x6 = 50,526,093,312
    assert preset("minicpm4-8b").flops_per_token(4096) == 50_526_093_312
    # the attention term is the only one that grows with s: 6 * L * n * d per extra token of context
    assert preset("minicpm4-8b").flops_per_token(8192) - preset("minicpm4-8b").flops_per_token(4096) == 6 * 32 * 32 * 128 * 4096


def test_mfu_against_hand_values() -> None:
    f = 3_206_922_240
    assert PEAK_TFLOPS_BF16 == 989.4
    # 136,217 tokens/s (MEASURED.md's torch.compile row): 136217 * 3.20692224e9 / 989.4e12 = 0.4415174...
    assert mfu(136_217, f) == pytest.approx(0.4415174, rel=1e-6)
    assert mfu(2 * 136_217, f, gpus=2) == pytest.approx(mfu(136_217, f))
    # 8B: 10,000 tokens/s on one GPU = 5.0526e14 / 9.894e14
    assert mfu(10_000, 50_526_093_312) == pytest.approx(0.5106740, rel=1e-6)


def test_median_and_summary() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        median([])
    cfg = preset("minicpm4-0.5b")
    times = [9.0, 5.0, 0.5, 0.25, 0.75]  # two warm-up steps are excluded
    s = summarize(times, warmup=2, tokens_per_step=8 * 4096, cfg=cfg, seq_length=4096)
    assert s["step_time_s"] == 0.5 and s["measured_steps"] == 3
    assert s["tokens_per_s"] == 8 * 4096 / 0.5
    assert s["mfu"] == pytest.approx(8 * 4096 / 0.5 * 3_206_922_240 / 989.4e12)
    with pytest.raises(ValueError):
        summarize([1.0, 2.0], warmup=2, tokens_per_step=1, cfg=cfg, seq_length=4096)


def test_ratios_skip_stacks_that_did_not_run() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None
    rows = [{"stack": "megatron-sdpa", "status": "ok", "tokens_per_s": 100.0},
            {"stack": "megatron", "status": "oom", "tokens_per_s": None},
            {"stack": "torch-compile", "status": "ok", "tokens_per_s": 150.0},
            {"stack": "engine:x", "status": "ok", "tokens_per_s": 165.0}]
    add_ratios(rows)
    assert rows[3]["vs"] == {"megatron-sdpa": 1.65, "megatron": None, "torch-compile": pytest.approx(1.1)}
    assert rows[1]["vs"]["torch-compile"] is None
    assert math.isclose(rows[2]["vs"]["torch-compile"], 1.0)


def test_device_slug() -> None:
    assert device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert device_slug("NVIDIA H200") == "h200"
    assert device_slug("cpu") == "cpu"
