"""The engine's `bench --op-table`, plus the ordered kernel timeline of its profiled steps: every kernel's
name, start and duration, so two op choices can be diffed kernel by kernel (the op table itself only
aggregates by name). Arguments after --trace FILE are the bench's own.

    python benchmarks/gpu/step_trace.py --trace OUT/trace.json.gz --seq-length 4096 --micro-batch-size 8 \
        --compile --op-table --ops gemm.qkv=concat --json OUT/bench.json
"""

from __future__ import annotations

import gzip
import json
import runpy
import sys
import time

import train_engine_0_5b.core.op_table as op_table_mod

_own_profile_steps = op_table_mod.profile_steps


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "--trace":
        raise SystemExit(__doc__)
    trace_path, bench_args = sys.argv[2], sys.argv[3:]

    def profile_steps(step, device, steps: int = 2) -> dict:
        if device.type != "cuda":
            return _own_profile_steps(step, device, steps)
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            wall_ms = (time.perf_counter() - t0) * 1e3
        kernels = sorted((e.time_range.start, e.time_range.elapsed_us(), e.name) for e in prof.events()
                         if e.device_type == DeviceType.CUDA)
        start = kernels[0][0] if kernels else 0
        with gzip.open(trace_path, "wt") as f:
            json.dump({"steps": steps, "kernels": [{"start_us": s - start, "us": us, "name": n[:160]} for s, us, n in kernels]}, f)
        return op_table_mod.breakdown([(n, us) for _, us, n in kernels], steps, wall_ms / steps, "cuda")

    op_table_mod.profile_steps = profile_steps
    sys.argv = ["train_engine_0_5b", "bench", *bench_args]
    runpy.run_module("train_engine_0_5b", run_name="__main__")


if __name__ == "__main__":
    main()
