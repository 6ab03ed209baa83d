"""Checkpoint directories (probe and pretrain alike) and the `latest` pointer of a save dir.

    DIR/  model.safetensors      float32 (float64 in fp64 cases) master weights, HF MiniCPM names
          optimizer.safetensors  exp_avg.NAME, exp_avg_sq.NAME
          rng.safetensors        micro_batch_order: the accumulation-order generator's state
          state.json             kind (probe | pretrain), step, adam_step, data_position, model, history,
                                 files (name -> size, checked on load)
    SAVE_DIR/step_00000003/ ...  pretrain: one such directory per saved step
    SAVE_DIR/latest              "step_00000003"

An atomic save fills a hidden temporary sibling, fsyncs it, renames it into place (swapping out an
older directory of the same step), and only then replaces `latest` (write, fsync, rename): a kill at
any moment leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = 1
MODEL, OPTIM, RNG, STATE, LATEST = "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "latest"


class CheckpointError(RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill(d: Path, files: dict[str, dict[str, torch.Tensor]], state: dict, pause: float = 0.0) -> None:
    for name, tensors in files.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(d / name))
        if pause:
            time.sleep(pause)
    sizes = {name: (d / name).stat().st_size for name in files}
    (d / STATE).write_text(json.dumps({"format": FORMAT, **state, "files": sizes}, indent=1) + "\n")


def write(final: Path, files: dict[str, dict[str, torch.Tensor]], state: dict, pointer: Path | None = None,
          atomic: bool = True, pause: float = 0.0) -> Path:
    """Write checkpoint directory `final`, then (if given) point `pointer` at it.
    atomic=False is a red-team flaw: the pointer moves first and the files are written in place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if not atomic:
        if pointer is not None:
            pointer.write_text(final.name + "\n")
        final.mkdir(exist_ok=True)
        _fill(final, files, state, pause)
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        _fill(tmp, files, state)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if final.exists():  # a resumed run saving a step again (its first save was not yet in `latest`)
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
    if pointer is not None:
        ptmp = pointer.with_name(f".{pointer.name}.tmp")
        ptmp.write_text(final.name + "\n")
        _fsync(ptmp)
        os.replace(ptmp, pointer)
        _fsync(pointer.parent)
    return final


def latest(save_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when the save dir has no pointer."""
    pointer = save_dir / LATEST
    if not pointer.is_file():
        return None
    return save_dir / pointer.read_text().strip()


def resolve(path: Path) -> Path:
    """A checkpoint directory, or a save dir (its `latest` checkpoint)."""
    if (path / STATE).is_file() or path.name.startswith("step_"):
        return path
    target = latest(path) if path.is_dir() else None
    if target is None:
        raise CheckpointError(f"no checkpoint at {path}: neither a checkpoint directory ({STATE}) nor a save dir ({LATEST})")
    return target


def read(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(state, {file: tensors}) of a checkpoint directory or save dir; every listed file is checked."""
    path = resolve(path)
    if not (path / STATE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {STATE}")
    try:
        state = json.loads((path / STATE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: {STATE} is damaged: {e}") from None
    files = {}
    for name, size in state["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: {name} is missing or truncated")
        files[name] = load_file(str(f))
    return state, files


def clean_partial(save_dir: Path) -> None:
    """Remove temporary directories a killed save left behind (never read)."""
    for d in save_dir.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in save_dir.glob(".old-*"):
        shutil.rmtree(d, ignore_errors=True)
