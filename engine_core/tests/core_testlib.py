"""Helpers of the core's tests (CPU, the engine's small model): the engine's processes and their logs, and the
closeness rules of runs that differ only in fp32 summation order. The engine is the export's (engine_fixture)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .engine_fixture import ENGINE, PACKAGE, SRC

# the gates' cap on one weight element's difference after AdamW steps, as a share of the summed LRs
# (the workspace's gates/policies.py ADAMW_STEP_SHARE; a workspace test checks they agree)
ADAMW_STEP_SHARE = 0.25


def engine_import(module: str, *names: str):
    """`from <the engine>.MODULE import NAMES` (the names, in order), or the module itself when no name is given."""
    mod = importlib.import_module(f"{PACKAGE}.{module}")
    if not names:
        return mod
    return tuple(getattr(mod, n) if hasattr(mod, n) else importlib.import_module(f"{mod.__name__}.{n}") for n in names)


def engine_env(**extra: str) -> dict[str, str]:
    """Environment for engine subprocesses: src on PYTHONPATH, one thread per process (several processes
    share this machine's cores)."""
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", FORGE_ENGINE_PROGRESS="0", **extra)


def torchrun(nproc: int, args: list, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m <the engine> ARGS` in `nproc` gloo ranks (torchrun, standalone)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", PACKAGE, *map(str, args)]
    return subprocess.run(cmd, env=engine_env(), capture_output=True, text=True, timeout=timeout, cwd=ENGINE)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_log(path: Path) -> list[dict]:
    """A step log as its readers take it: each step's last line, in step order; a line a kill cut short
    (not JSON) is skipped."""
    last: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        last[record["step"]] = record
    return [last[step] for step in sorted(last)]


def rel_err(a, b) -> float:
    """max |a - b| / max |a| (normwise relative error; 0 for two zero tensors)."""
    a, b = a.double(), b.double()
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_adamw_weights_close(ref: dict, other: dict, lrs, tol: float = 1e-5) -> None:
    """Weights after AdamW steps at learning rates `lrs` from two runs that differ only in fp32 summation order.

    No fixed max bound fits: an element whose gradient nearly cancels turns its rounding difference into
    a large part of an AdamW step, so the worst element is heavy-tailed across seeds (a 1e-4 max bound
    failed CI once, at 1.9e-4). Held instead: 99 % of each tensor's elements within `tol` x max |ref|, and
    no element off by more than the gates' AdamW step cap (ADAMW_STEP_SHARE of the summed LRs).
    """
    import torch

    cap = ADAMW_STEP_SHARE * float(torch.as_tensor(lrs, dtype=torch.float64).abs().sum())
    assert set(ref) == set(other)
    for name, r in ref.items():
        diff = (r.double() - other[name].double()).abs().flatten()
        assert torch.isfinite(diff).all(), name
        within = (diff <= tol * r.abs().max().item()).double().mean().item()
        assert within >= 0.99, (name, f"only {within:.4f} of elements within {tol:g}")
        assert diff.max().item() <= cap, (name, diff.max().item(), cap)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread per test module (module scope: set before module fixtures run): on a small shared CPU
    two OpenMP threads wait on each other at every op (a 40x slowdown measured on the 2-core CI box);
    subprocesses get OMP_NUM_THREADS=1 from engine_env. A conftest imports it to apply it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_graphed_matches_eager(graphed: dict, eager: dict, steps: int, valid_tokens: int) -> None:
    """A CUDA-graphed run against the eager run of the same weights, data and LR schedule (GPU tests of both
    engines). Each run: per-step `losses`, `norms`, `counts`, `lrs`; the `start` and final `master` weights; its
    `trainer` and `step`. Replays happened, the LRs and counts are the eager ones, and losses, norms and updates
    agree (FA4's backward accumulates dQ with atomics: closely, not bit for bit)."""
    import torch

    assert graphed["step"].captured  # the steps after the warm-up and the capture were replays
    assert graphed["trainer"].optimizer.step_count == eager["trainer"].optimizer.step_count == steps
    assert graphed["lrs"] == eager["lrs"] and len(set(eager["lrs"])) == steps
    assert graphed["counts"] == eager["counts"] == [valid_tokens] * steps
    assert len(set(graphed["losses"])) == steps  # distinct batches gave distinct losses: inputs were re-read
    torch.testing.assert_close(graphed["losses"], eager["losses"], rtol=2e-3, atol=0)
    torch.testing.assert_close(graphed["norms"], eager["norms"], rtol=2e-2, atol=0)
    assert min(eager["norms"]) > 0.05  # clipping engaged every step
    moved = sum((m - s).abs().sum() for m, s in zip(eager["master"], eager["start"]))
    apart = sum((g - e).abs().sum() for g, e in zip(graphed["master"], eager["master"]))
    assert apart < 0.05 * moved, (float(apart), float(moved))  # the graph's updates are the eager ones
