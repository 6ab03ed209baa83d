"""The save directory's layout: step folders, the `latest` pointer, and what a killed save leaves.

    SAVE_DIR/step_00000120/   a checkpoint (checkpoint.py)
    SAVE_DIR/latest           "step_00000120": the newest complete checkpoint
    SAVE_DIR/.latest.tmp      the pointer a save in progress will install (written before its rename)
    SAVE_DIR/.tmp-*  .old-*   a save in progress (or killed): never read, removed at the next start

Every problem is one line naming the file: a `latest` that is not valid UTF-8, names a path outside the
save dir or something that is not a step folder; step folders without `latest` (the newest valid one is
named, never a silent restart from step 0 over them); a --save-dir that is a file or not writable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import EngineError

STATE_FILE, LATEST, PENDING = "state.json", "latest", ".latest.tmp"
STEP_DIR = re.compile(r"step_(\d{8})")
STALE_PREFIXES = (".tmp-", ".old-")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pointer(path: Path, name: str) -> None:
    """`path` holds `name`, durably (written, fsynced)."""
    path.write_text(name + "\n", encoding="utf-8")
    fsync(path)


def folder_step(path: Path) -> int | None:
    """The step a folder's name says (step_XXXXXXXX), else None."""
    m = STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def problem(step_dir: Path) -> str | None:
    """Why `step_dir` is not a complete checkpoint (cheap: state.json, its step, every file's size), or None."""
    try:
        state = json.loads((step_dir / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{step_dir} has no {STATE_FILE}"
    except (OSError, ValueError) as e:
        return f"{step_dir / STATE_FILE} is damaged ({e})"
    if not isinstance(state, dict):
        return f"{step_dir / STATE_FILE} is not a JSON object"
    want = folder_step(step_dir)
    if want is not None and state.get("step") != want:
        return f"{step_dir / STATE_FILE} says step {state.get('step')!r}, its folder {step_dir.name} says {want}"
    for name, size in (state.get("files") or {}).items():
        f = step_dir / name
        if not f.is_file():
            return f"{step_dir} is incomplete: {name} is missing"
        if f.stat().st_size != size:
            return f"checkpoint file {f} is truncated or damaged: {f.stat().st_size} bytes, expected {size}"
    return None


def step_dirs(save_dir: Path) -> list[Path]:
    """Step folders, newest first."""
    found = [p for p in save_dir.iterdir() if p.is_dir() and folder_step(p) is not None] if save_dir.is_dir() else []
    return sorted(found, key=folder_step, reverse=True)


def newest_valid(save_dir: Path) -> Path | None:
    return next((d for d in step_dirs(save_dir) if problem(d) is None), None)


def read_pointer(pointer: Path, save_dir: Path) -> Path:
    """The step folder a pointer file names; EngineError unless it is a folder inside `save_dir`."""
    if pointer.is_dir():
        raise EngineError(f"{pointer} is a directory; it should be a file naming a step folder of {save_dir}")
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise EngineError(f"{pointer} is not valid UTF-8; it should name a step folder of {save_dir}") from None
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or "\n" in name:
        raise EngineError(f"{pointer} names {name!r}, which is not a folder inside {save_dir}")
    target = save_dir / name
    if not target.is_dir():
        raise EngineError(f"{pointer} names {name!r}, which is not a folder in {save_dir}")
    if target.resolve().parent != save_dir.resolve():
        raise EngineError(f"{pointer} names {name!r}, which leads outside {save_dir} (to {target.resolve()})")
    return target


def find_latest(save_dir: Path) -> Path | None:
    """The folder `latest` names, or None when save_dir holds no checkpoint at all."""
    if not save_dir.exists():
        return None
    if not save_dir.is_dir():
        raise EngineError(f"--save-dir {save_dir} is not a directory")
    pointer = save_dir / LATEST
    if not pointer.exists():
        if step_dirs(save_dir):
            newest = newest_valid(save_dir)
            hint = (f"the newest valid checkpoint is {newest.name}: restore the pointer with `echo {newest.name} > {pointer}`"
                    if newest is not None else "none of them is a complete checkpoint")
            raise EngineError(f"{save_dir} holds step folders but no `{LATEST}` pointer; {hint} (or choose another --save-dir)")
        return None
    target = read_pointer(pointer, save_dir)
    why = problem(target)
    if why is not None:
        raise EngineError(f"{pointer} names {target.name}, which is not a complete checkpoint: {why}")
    return target


def clean(save_dir: Path) -> list[str]:
    """Rank 0, before anything reads `latest`: finish a save killed between its rename and its pointer
    (the pending pointer names a complete, newer checkpoint), then remove what killed saves left.
    Returns one note per thing done."""
    if not save_dir.is_dir():
        return []
    notes = []
    pending = save_dir / PENDING
    if pending.is_file():
        try:
            target = read_pointer(pending, save_dir)
        except EngineError:
            target = None
        current = save_dir / LATEST
        now = folder_step(read_pointer(current, save_dir)) if current.is_file() else None
        if target is not None and problem(target) is None and (now is None or (folder_step(target) or -1) > now):
            os.replace(pending, current)
            fsync(save_dir)
            notes.append(f"note: finished a save that was killed before its pointer: {current} -> {target.name}")
        else:
            pending.unlink()
    stale = sorted(p for p in save_dir.iterdir() if p.name.startswith(STALE_PREFIXES))
    for p in stale:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if stale:
        notes.append(f"note: removed {len(stale)} temporary entr{'y' if len(stale) == 1 else 'ies'} of killed saves in "
                     f"{save_dir}: {', '.join(p.name for p in stale)}")
    return notes


def check_writable(save_dir: Path) -> None:
    """--save-dir must be (or become) a writable directory: checked before the first step."""
    if save_dir.exists() and not save_dir.is_dir():
        raise EngineError(f"--save-dir {save_dir} is a file, not a directory")
    probe = save_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise EngineError(f"--save-dir {save_dir}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EngineError(f"--save-dir {save_dir}: permission denied (cannot write in {probe})")
