"""The one clock for timing a call: `warmup` calls, then `reps` calls each timed alone, summarized as a median and
a spread. On a GPU each call sits between two CUDA events (the L2 optionally flushed before it, outside the
timed span); on a CPU, `time.perf_counter` around it. Self-contained (torch and the standard library only), so
the per-op harness's child and the workspace's GPU scripts can load it as they find it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 << 20  # written before each call: larger than any GPU's L2 (H100/H200: 50 MiB)
CLOCKS = {"cuda": "cuda events", "cpu": "perf_counter"}


@dataclass(frozen=True)
class Timing:
    """One timed run: each rep's milliseconds, in call order, and how they were taken."""

    times_ms: tuple[float, ...]
    clock: str            # "cuda events" or "perf_counter"
    l2_flushed: bool

    @property
    def reps(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.05 means the reps span 5% of the median."""
        median = self.median_ms
        return (max(self.times_ms) - self.min_ms) / median if median > 0 else 0.0


def time_calls(fn: Callable[[], object], *, device: str | torch.device, reps: int = 20, warmup: int = 5,
               l2_flush_bytes: int = 0) -> Timing:
    """Call `fn` `warmup` times, then time `reps` calls one by one on `device`'s clock (CUDA: on the current
    stream). `l2_flush_bytes` > 0 (CUDA only): a buffer that size is written before each timed call.
    ValueError on a bad argument."""
    dev = torch.device(device)
    if dev.type not in CLOCKS:
        raise ValueError(f"device: {dev} has no clock here; use one of {sorted(CLOCKS)}")
    if reps < 1:
        raise ValueError(f"reps: {reps}; at least 1 call must be timed")
    if warmup < 0:
        raise ValueError(f"warmup: {warmup}; must be 0 or more")
    if l2_flush_bytes < 0 or (l2_flush_bytes and dev.type != "cuda"):
        raise ValueError(f"l2_flush_bytes: {l2_flush_bytes}; must be 0, or positive on a CUDA device")
    flush = torch.empty(l2_flush_bytes, dtype=torch.uint8, device=dev) if l2_flush_bytes else None
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        times = _cuda_times(fn, reps, flush)
    else:
        times = _cpu_times(fn, reps)
    return Timing(tuple(times), CLOCKS[dev.type], flush is not None)


def interleaved_ms(fns: Mapping[str, Callable[[], object]], rounds: int, *, device: str | torch.device,
                   reps: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """Each fn's median ms once per round, the rounds interleaved so clock and temperature drift hit every fn."""
    if rounds < 1:
        raise ValueError(f"rounds: {rounds}; at least 1")
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(time_calls(fn, device=device, reps=reps, warmup=warmup).median_ms)
    return out


def _cuda_times(fn: Callable[[], object], reps: int, flush: torch.Tensor | None) -> list[float]:  # GPU-only
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.fill_(1)  # the L2 holds none of fn's inputs
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _cpu_times(fn: Callable[[], object], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times
