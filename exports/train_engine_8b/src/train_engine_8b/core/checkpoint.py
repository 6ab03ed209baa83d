"""Checkpoints: atomic directories of safetensors + one JSON state, and a `latest` pointer.

    SAVE_DIR/step_00000120/  model.safetensors      fp32 master weights, HF MiniCPM names
                             optimizer.safetensors  exp_avg.NAME, exp_avg_sq.NAME
                             rng.safetensors        rank{r}.torch_cpu, rank{r}.cuda (every rank's generators)
                             tokenizer/             the tokenizer files the run used
                             state.json             step, configs, data cursor, schedule, python RNG, file
                                                    sizes, sha256 of every tensor and file (checksums.py)
    SAVE_DIR/latest          "step_00000120"

A save writes everything into a hidden temporary directory and fsyncs it, writes the pointer it will
install (`.latest.tmp`), renames the directory into place, then installs the pointer; a crash at any
point leaves the last good checkpoint and pointer intact (ckpt_dir.clean finishes or removes what it
left). Load checks, before any tensor is trusted: the step against the folder name, each file's size
(a truncated or missing file is named), each tensor's checksum (a changed byte is named).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import checksums
from .ckpt_dir import LATEST, PENDING, STATE_FILE, find_latest, fsync, problem, step_dir_name, write_pointer
from .errors import EngineError

FORMAT = 2  # 2: state.json carries checksums; format 1 (without them) is still read
READABLE_FORMATS = (1, 2)
MODEL_FILE, OPTIM_FILE, RNG_FILE = "model.safetensors", "optimizer.safetensors", "rng.safetensors"
TOKENIZER_DIR = "tokenizer"
__all__ = ["LATEST", "STATE_FILE", "find_latest", "step_dir_name"]  # the layout's names, re-exported


@dataclass
class Checkpoint:
    path: Path
    state: dict  # state.json
    master: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


@contextmanager
def atomic_directory(final: Path, before_rename: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yields a hidden temporary sibling of `final` to fill; on success it is fsynced, `before_rename`
    runs, and it is renamed to `final` (replacing an older one); on any failure it is removed: `final`
    is never half written."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            fsync(f)
        fsync(tmp)
        if before_rename is not None:
            before_rename()
        if final.exists():  # e.g. a resumed run saving its last step again: swap the old one out
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(save_dir: Path, step: int, master: dict[str, torch.Tensor], optim: dict[str, torch.Tensor],
         rng: dict[str, torch.Tensor], state: dict, tokenizer=None) -> Path:
    """Write step `step` atomically, then point `latest` at it; returns its directory. Called by one rank."""
    final, pending = save_dir / step_dir_name(step), save_dir / PENDING
    parts = {MODEL_FILE: _cpu(master), OPTIM_FILE: _cpu(optim), RNG_FILE: _cpu(rng)}
    try:
        with atomic_directory(final, before_rename=lambda: write_pointer(pending, final.name)) as tmp:
            for name, tensors in parts.items():
                save_file(tensors, str(tmp / name), metadata={"format": "pt"} if name != RNG_FILE else None)
            sums: dict = {name: checksums.tensor_digests(tensors) for name, tensors in parts.items()}
            if tokenizer is not None:
                tokenizer.save(tmp / TOKENIZER_DIR)
            files = {str(f.relative_to(tmp)): f for f in sorted(tmp.rglob("*")) if f.is_file()}
            sums |= {name: checksums.file_digest(f) for name, f in files.items() if name not in parts}
            body = {"format": FORMAT, "step": step, **state, "files": {n: f.stat().st_size for n, f in files.items()},
                    "checksums": {"algorithm": checksums.ALGORITHM, "files": sums}}
            (tmp / STATE_FILE).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    except BaseException:
        if not final.is_dir() or problem(final) is not None:  # the rename did not happen: nothing to point at
            pending.unlink(missing_ok=True)
        raise
    os.replace(pending, save_dir / LATEST)
    fsync(save_dir)
    return final


def resolve(path: Path) -> Path:
    """A checkpoint directory, or a save dir (its latest checkpoint)."""
    if (path / STATE_FILE).is_file():
        return path
    latest = find_latest(path) if path.is_dir() else None
    if latest is None:
        raise EngineError(f"no checkpoint at {path} (expected a step directory with {STATE_FILE}, or a save dir with `{LATEST}`)")
    return latest


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise EngineError(f"checkpoint file {path} is damaged: {e}") from None


def load(path: Path) -> Checkpoint:
    """Read and verify a checkpoint (a step directory or a save dir)."""
    path = resolve(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"checkpoint file {path / STATE_FILE} is damaged (not JSON: {e})") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format") if isinstance(state, dict) else None
        raise EngineError(f"checkpoint {path} has format {found!r}; this engine reads formats {READABLE_FORMATS}")
    why = problem(path)
    if why is not None:
        raise EngineError(why)
    sums = state.get("checksums", {}).get("files") if state["format"] >= 2 else None
    if state["format"] >= 2 and not isinstance(sums, dict):
        raise EngineError(f"checkpoint file {path / STATE_FILE} is damaged: it has no checksums")
    parts = {}
    for name in (MODEL_FILE, OPTIM_FILE, RNG_FILE):
        parts[name] = _load_tensors(path / name)
        if sums is not None:
            checksums.verify_tensors(path / name, parts[name], sums.get(name, {}))
    for name, digest in (sums or {}).items():
        if name not in parts:
            checksums.verify_file(path / name, digest)
    return Checkpoint(path, state, parts[MODEL_FILE], parts[OPTIM_FILE], parts[RNG_FILE])


def dump_state(path: Path, out: Path) -> Path:
    """`dump-state`: a checkpoint's master weights and moments under the training contract's names."""
    loaded = load(path)
    tensors = {f"weight.{k}": v for k, v in loaded.master.items()} | dict(loaded.optim)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(tensors), str(out / "tensors.safetensors"))
    (out / "metrics.json").write_text(json.dumps({"step": loaded.step, "checkpoint": str(loaded.path)}, indent=2) + "\n")
    return out


def mismatches(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Fields that differ between two JSON-like dicts, as 'field: saved -> current'."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += mismatches(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
