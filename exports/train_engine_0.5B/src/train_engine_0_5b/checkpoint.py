"""Checkpoints: atomic directories of safetensors + one JSON state, and a `latest` pointer.

    SAVE_DIR/step_00000120/  model.safetensors      fp32 master weights, HF MiniCPM names
                             optimizer.safetensors  exp_avg.NAME, exp_avg_sq.NAME
                             rng.safetensors        rank{r}.torch_cpu, rank{r}.cuda (every rank's generators)
                             tokenizer/             the tokenizer files the run used
                             state.json             step, configs, data cursor, schedule, python RNG, file sizes
    SAVE_DIR/latest          "step_00000120"

A save writes everything into a hidden temporary directory, fsyncs it, renames it into place, then
replaces `latest` (write + fsync + rename), so a crash at any point leaves the last good checkpoint
and pointer intact (and at most a `.tmp-*` directory, never read). state.json records each file's
size: a truncated or missing file is named on load, before any tensor is trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from train_engine_0_5b.errors import EngineError

FORMAT = 1
MODEL_FILE, OPTIM_FILE, RNG_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"
TOKENIZER_DIR, LATEST = "tokenizer", "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yields a hidden temporary sibling of `final` to fill; on success it is fsynced and renamed to
    `final` (replacing an older one), on any failure it is removed: `final` is never half written."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            _fsync(f)
        _fsync(tmp)
        if final.exists():  # e.g. a resumed run saving its last step again: swap the old one out
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(save_dir: Path, step: int, master: dict[str, torch.Tensor], optim: dict[str, torch.Tensor],
         rng: dict[str, torch.Tensor], state: dict, tokenizer=None) -> Path:
    """Write step `step` atomically, then point `latest` at it; returns its directory. Called by one rank."""
    final = save_dir / step_dir_name(step)
    with atomic_directory(final) as tmp:
        save_file(_cpu(master), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        save_file(_cpu(optim), str(tmp / OPTIM_FILE), metadata={"format": "pt"})
        save_file(_cpu(rng), str(tmp / RNG_FILE))
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        body = {"format": FORMAT, "step": step, **state, "files": files}
        (tmp / STATE_FILE).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    pointer = save_dir / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    _fsync(pointer)
    os.replace(pointer, save_dir / LATEST)
    _fsync(save_dir)
    return final


def find_latest(save_dir: Path) -> Path | None:
    """The directory `latest` names, or None when save_dir holds no checkpoint."""
    pointer = save_dir / LATEST
    if not pointer.is_file():
        return None
    target = save_dir / pointer.read_text().strip()
    if not (target / STATE_FILE).is_file():
        raise EngineError(f"{pointer} names {target.name}, which is not a complete checkpoint")
    return target


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
        state = json.loads((path / STATE_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"checkpoint file {path / STATE_FILE} is damaged (not JSON: {e})") from None
    if state.get("format") != FORMAT:
        raise EngineError(f"checkpoint {path} has format {state.get('format')!r}; this engine reads format {FORMAT}")
    for name, size in state.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise EngineError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != size:
            raise EngineError(f"checkpoint file {f} is truncated or damaged: {f.stat().st_size} bytes, expected {size}")
    return Checkpoint(path, state, _load_tensors(path / MODEL_FILE), _load_tensors(path / OPTIM_FILE),
                      _load_tensors(path / RNG_FILE))


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
