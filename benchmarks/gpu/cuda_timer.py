"""CUDA-event timing for the standalone GPU scripts here (the engine keeps its own in op_table.py: exports
stay self-contained, and these scripts do not import engine internals)."""

from __future__ import annotations

import statistics
from typing import Callable, Mapping

import torch


def median_ms(fn: Callable[[], object], iters: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of `fn` on the current stream, each call timed alone between two events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def interleaved_ms(fns: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """median_ms of each fn once per round, the rounds interleaved so clock and temperature drift hit every fn."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(median_ms(fn, warmup=warmup))
    return out
