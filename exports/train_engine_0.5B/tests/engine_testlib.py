"""Helpers for the engine's tests (CPU, tiny model); imported as `engine_testlib` (a name no other
test folder uses, so the repository-wide pytest run cannot confuse it with another module).

Importing it puts the engine's src/ on sys.path (the tests run without installing the engine) and the
workspace root (some tests compare against the workspace's torch reference, `gates`; the engine
itself never imports `gates`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1]
SRC = ENGINE / "src"
ROOT = ENGINE.parents[1]
for p in (SRC, ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# Small enough for a slow 2-core CPU: the tiny preset (vocab 4096 = the shipped tokenizer's size).
TINY = ["--model", "tiny", "--device", "cpu", "--seq-length", "32", "--warmup-steps", "2", "--lr", "3e-3"]


def engine_env(**extra: str) -> dict[str, str]:
    """Environment for engine subprocesses: src + workspace on PYTHONPATH, one thread per process
    (several processes share this machine's cores)."""
    path = os.pathsep.join(filter(None, [str(SRC), str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", FORGE_ENGINE_PROGRESS="0", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "train_engine_0_5b", *map(str, args)]
    return subprocess.run(cmd, env=engine_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


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
    failed CI once, at 1.9e-4; gates/policies.py says more). Held instead: 99 % of each tensor's elements
    within `tol` x max |ref|, and no element off by more than the gates' AdamW step cap
    (policies.adamw_step_cap: a quarter of the summed LRs). Over 200 CPU seeds of the probe test the worst
    were 2.5e-6 and 3.4e-3 of the summed LRs.
    """
    import torch

    from gates.policies import adamw_step_cap

    cap = adamw_step_cap(torch.as_tensor(lrs, dtype=torch.float64))
    assert set(ref) == set(other)
    for name, r in ref.items():
        diff = (r.double() - other[name].double()).abs().flatten()
        assert torch.isfinite(diff).all(), name
        within = (diff <= tol * r.abs().max().item()).double().mean().item()
        assert within >= 0.99, (name, f"only {within:.4f} of elements within {tol:g}")
        assert diff.max().item() <= cap, (name, diff.max().item(), cap)


def sm90() -> bool:
    """A Hopper (or newer) GPU is here: what the flash4 and quack_gated kernel tests need."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
