"""Checksums a checkpoint records in state.json and verifies on load: sha256 of each tensor (its dtype,
shape and bytes) of a safetensors file (formats 1-2), of each named byte range of a file whose ranges are
tensors (formats 3-4: DCP's shard files, a range per stored tensor), and of each other file. A byte changed
after the save, even at the same size (garbage, a NaN written over a weight), is named on load.

Hashing runs on a thread pool: hashlib releases the GIL on large buffers, so the 0.5B model's ~6 GB of
master weights and moments hash in parallel.
"""

from __future__ import annotations

import hashlib
import mmap
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


Segment = tuple[str, int, int]  # a name, and the [start, end) bytes of a file it covers


def segment_digests(path: Path, segments: list[Segment]) -> list[list]:
    """[[name, start, end, sha256], ...] of `path`'s byte ranges (read through mmap, hashed on the pool)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else _Empty() as m:
        view = memoryview(m)
        try:
            with _pool() as pool:
                sums = list(pool.map(lambda s: hashlib.sha256(view[s[1] : s[2]]).hexdigest(), segments))
        finally:
            view.release()
    return [[name, a, b, h] for (name, a, b), h in zip(segments, sums)]


class _Empty(bytes):
    """mmap refuses an empty file; its segments are empty too."""

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


def verify_segments(path: Path, expected: list[list]) -> None:
    """EngineError naming `path` and the first range (tensor) whose checksum differs."""
    got = segment_digests(path, [(name, a, b) for name, a, b, _ in expected])
    bad = [g[0] for g, e in zip(got, expected) if g[3] != e[3]]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise EngineError(f"checkpoint file {path} is damaged: tensor {bad[0]}{more} fails its {ALGORITHM} checksum "
                          "(its bytes changed after the save)")
