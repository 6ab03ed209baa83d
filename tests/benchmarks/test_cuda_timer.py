"""The GPU scripts' clock (benchmarks/gpu/cuda_timer.py) is engine_core's timer, loaded by path as the scripts load
it (their own folder on sys.path); its CPU path runs here."""

from __future__ import annotations

import sys
from pathlib import Path

GPU_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"


def test_the_gpu_scripts_clock_is_engine_cores_timer(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(GPU_DIR))
    monkeypatch.delitem(sys.modules, "cuda_timer", raising=False)
    import cuda_timer

    assert cuda_timer.SOURCE == GPU_DIR.parents[1] / "engine_core" / "core" / "timer.py"
    assert cuda_timer.time_calls.__code__.co_filename == str(cuda_timer.SOURCE)
    t = cuda_timer.time_calls(lambda: sum(range(100)), device="cpu", reps=3, warmup=1)
    assert isinstance(t, cuda_timer.Timing) and t.reps == 3 and t.clock == "perf_counter"
    assert {k: len(v) for k, v in cuda_timer.interleaved_ms({"a": lambda: None}, 2, device="cpu").items()} == {"a": 2}
