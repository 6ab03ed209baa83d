"""Checksums a checkpoint records in state.json and verifies on load: sha256 of each tensor (its dtype,
shape and bytes) of the safetensors files, and of each other file (the tokenizer's). A byte changed
after the save, even at the same size (garbage, a NaN written over a weight), is named on load.

Hashing runs on a thread pool: hashlib releases the GIL on large buffers, so the 0.5B model's ~6 GB of
master weights and moments hash in parallel.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import EngineError

ALGORITHM = "sha256"


def tensor_digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="checksum")


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    names = sorted(tensors)
    with _pool() as pool:
        return dict(zip(names, pool.map(lambda n: tensor_digest(tensors[n]), names)))


def verify_tensors(file: Path, tensors: dict[str, torch.Tensor], expected: dict[str, str]) -> None:
    """EngineError naming `file` and the first tensor whose checksum differs (or that is missing / extra)."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"lacks tensor {missing[0]}" if missing else f"holds unexpected tensor {extra[0]}"
        raise EngineError(f"checkpoint file {file} is damaged: it {what} (state.json's checksums list differs)")
    got = tensor_digests(tensors)
    bad = [n for n in sorted(expected) if got[n] != expected[n]]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise EngineError(f"checkpoint file {file} is damaged: tensor {bad[0]}{more} fails its {ALGORITHM} checksum "
                          "(its bytes changed after the save)")


def verify_file(path: Path, expected: str) -> None:
    if file_digest(path) != expected:
        raise EngineError(f"checkpoint file {path} is damaged: it fails its {ALGORITHM} checksum (changed after the save)")
