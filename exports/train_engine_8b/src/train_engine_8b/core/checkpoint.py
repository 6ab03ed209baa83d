"""Checkpoints: atomic directories of sharded optimizer state (torch.distributed.checkpoint) + one JSON
state, and a `latest` pointer.

    SAVE_DIR/step_00000120/  optimizer/             DCP: master.NAME (fp32 master weights, HF MiniCPM names),
                                                    exp_avg.NAME, exp_avg_sq.NAME (global shapes), step_count;
                                                    `__{rank}_{i}.distcp` written by each rank, `.metadata`
                             rng.safetensors        rank{r}.torch_cpu, rank{r}.cuda (every rank's generators)
                             tokenizer/             the tokenizer files the run used
                             state.json             step, configs, data cursor, schedule, python RNG, the
                                                    parameters' shapes, file sizes, sha256 of every file
                                                    (of each tensor's bytes in a shard file: checksums.py)
    SAVE_DIR/latest          "step_00000120"

A save is a collective: rank 0 makes a hidden temporary directory; every rank writes its own shards of the
optimizer state into it, hashes and fsyncs its own shard files; rank 0 writes rng, the tokenizer and
state.json (with every rank's digests), fsyncs, writes the pointer it will install (`.latest.tmp`), renames
the directory into place, then installs the pointer. A crash at any point leaves the last good checkpoint
and pointer intact (ckpt_dir.clean finishes or removes what it left). A checkpoint written by N ranks,
ZeRO-1 or not, at one tensor-parallel degree, resumes on M at any other (`open_to_resume` + `restore`); `load` reads it whole in one process
(export-hf, dump-state). Before any tensor is trusted: the step against the folder name, each file's
size (a truncated or missing file is named), each checksum (a changed byte is named with its tensor).
Formats 1 and 2 (whole safetensors files, ckpt_legacy.py) and 3 (the optimizer state flattened to 1-D, before
tensor parallelism) are still read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

from . import checksums, ckpt_legacy, sharded_state
from .ckpt_dir import LATEST, PENDING, STATE_FILE, find_latest, fsync, problem, step_dir_name, write_pointer
from .dist import DistContext
from .errors import EngineError
from .optim import AdamW
from .trainer import Trainer

FORMAT = 4  # 4: sharded optimizer state through DCP in global shapes; 3: the same flattened; 1-2: ckpt_legacy.py
FLAT_FORMAT = 3
READABLE_FORMATS = (*ckpt_legacy.FORMATS, FLAT_FORMAT, FORMAT)
OPTIM_DIR, RNG_FILE, TOKENIZER_DIR = "optimizer", "rng.safetensors", "tokenizer"
SHARD_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # DCP's FileSystemWriter: file i of rank r
__all__ = ["LATEST", "STATE_FILE", "find_latest", "step_dir_name"]  # the layout's names, re-exported


class SaveFailed(EngineError):
    """A save that wrote nothing visible (the last good checkpoint and `latest` are untouched); raised on
    every rank with the same reason."""


@dataclass
class Checkpoint:
    path: Path
    state: dict  # state.json
    rng: dict[str, torch.Tensor]
    # whole tensors: always after `load`; after `open_to_resume` only for formats 1-2 (formats 3-4 restore sharded)
    master: dict[str, torch.Tensor] | None = None
    optim: dict[str, torch.Tensor] | None = None

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def format(self) -> int:
        return int(self.state["format"])


# -- the temporary directory and its rename ---------------------------------------------------------------

def _temporary(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))


def _install(tmp: Path, final: Path, before_rename: Callable[[], None] | None) -> None:
    """fsync `tmp`, run `before_rename`, rename it to `final` (replacing an older one); on failure `tmp` is removed."""
    try:
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


@contextmanager
def atomic_directory(final: Path, before_rename: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yields a hidden temporary sibling of `final` to fill; on success it is fsynced, `before_rename`
    runs, and it is renamed to `final` (replacing an older one); on any failure it is removed: `final`
    is never half written. One process."""
    tmp = _temporary(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _install(tmp, final, before_rename)


# -- save --------------------------------------------------------------------------------------------------

WRITE_ERRORS = (OSError, SafetensorError)
FULL_BYTES = 1 << 20  # a write that failed with less free space than this failed for the full disk


def _reason(e: BaseException, where: Path) -> str:
    """One line for a failed write into `where` (DCP wraps each rank's exception: the first one is named)."""
    failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner  # (exception, its traceback)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({e.filename or where})"
    with contextlib.suppress(OSError):  # torch's zip writer reports a short write (ENOSPC) as "unexpected pos"
        if shutil.disk_usage(where).free < FULL_BYTES:
            return f"No space left on device ({where}: {e})"
    return str(e)


def _shard_segments(metadata, tmp: Path) -> dict[str, list[checksums.Segment]]:
    """Each DCP shard file (relative to the checkpoint) -> the byte ranges of its tensors, in file order,
    covering the whole file."""
    items: dict[str, list[tuple[int, str]]] = {}
    for index, info in metadata.storage_data.items():
        offset = f"@{','.join(map(str, index.offset))}" if index.offset is not None and any(index.offset) else ""
        items.setdefault(f"{OPTIM_DIR}/{info.relative_path}", []).append((info.offset, index.fqn + offset))
    out = {}
    for rel, found in items.items():
        found.sort()
        size = (tmp / rel).stat().st_size
        ends = [start for start, _ in found[1:]] + [size]
        out[rel] = ([("(file start)", 0, found[0][0])] if found[0][0] else []) + [
            (name, start, end) for (start, name), end in zip(found, ends)]
    return out


def _owner(rel: str) -> int:
    """The rank that wrote (and hashes) a file of the checkpoint: a DCP shard file's, else rank 0."""
    m = SHARD_FILE.fullmatch(Path(rel).name)
    return int(m.group(1)) if m else 0


def _hash_own(tmp: Path, metadata, ctx: DistContext) -> dict:
    """This rank's shard files: their tensors' digests; fsynced (rank 0 hashes every other file later)."""
    out: dict = {}
    for rel, segments in _shard_segments(metadata, tmp).items():
        if _owner(rel) % ctx.world == ctx.rank:
            out[rel] = {"segments": checksums.segment_digests(tmp / rel, segments)}
            fsync(tmp / rel)
    return out


def save(save_dir: Path, step: int, optimizer: AdamW, ctx: DistContext, rng: dict[str, torch.Tensor], state: dict,
         tokenizer=None) -> Path:
    """Write step `step` atomically, then point `latest` at it; returns its directory. A collective: every rank
    calls it with its optimizer (its own shards under ZeRO-1); `state`, `rng` and `tokenizer` are rank 0's.
    A failed write raises SaveFailed on every rank and leaves nothing behind."""
    final, pending = save_dir / step_dir_name(step), save_dir / PENDING
    made: str | None = None
    if ctx.is_main:
        try:
            made = str(_temporary(final))
        except WRITE_ERRORS as e:
            made = "!" + _reason(e, save_dir)
    made = ctx.all_gather_object(made)[0]
    if made.startswith("!"):
        raise SaveFailed(made[1:])
    tmp = Path(made)
    sums: dict = {}
    failure = None
    try:
        metadata = sharded_state.save_optimizer(tmp / OPTIM_DIR, optimizer)  # every rank: its own shards
        sums = _hash_own(tmp, metadata, ctx)
        if ctx.is_main:
            save_file({k: v.detach().contiguous().cpu() for k, v in rng.items()}, str(tmp / RNG_FILE))
            if tokenizer is not None:
                tokenizer.save(tmp / TOKENIZER_DIR)
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException; any rank's failure stops every rank below
        failure = e
    gathered = ctx.all_gather_object((sums, None if failure is None else _reason(failure, save_dir)))
    reason = next((why for _, why in gathered if why is not None), None)
    if reason is None and ctx.is_main:
        try:
            files = {str(f.relative_to(tmp)): f for f in sorted(tmp.rglob("*")) if f.is_file()}
            sums = {k: v for part, _ in gathered for k, v in part.items()}
            sums |= {name: checksums.file_digest(f) for name, f in files.items() if name not in sums}
            body = {"format": FORMAT, "step": step, **state, "shapes": sharded_state.shapes(optimizer),
                    "files": {n: f.stat().st_size for n, f in files.items()},
                    "checksums": {"algorithm": checksums.ALGORITHM, "files": sums}}
            (tmp / STATE_FILE).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
            _install(tmp, final, before_rename=lambda: write_pointer(pending, final.name))
            os.replace(pending, save_dir / LATEST)
            fsync(save_dir)
        except BaseException as e:
            if not final.is_dir() or problem(final) is not None:  # the rename did not happen: nothing to point at
                pending.unlink(missing_ok=True)
            failure, reason = e, _reason(e, save_dir)
    if ctx.is_main and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    reason = ctx.all_gather_object(reason)[0]  # every rank stops with rank 0 (and waits for its rename)
    if failure is not None and not isinstance(failure, (*WRITE_ERRORS, EngineError, CheckpointException)):
        raise failure
    if reason is not None:
        raise SaveFailed(reason)
    return final


# -- load --------------------------------------------------------------------------------------------------

def resolve(path: Path) -> Path:
    """A checkpoint directory, or a save dir (its latest checkpoint)."""
    if (path / STATE_FILE).is_file():
        return path
    latest = find_latest(path) if path.is_dir() else None
    if latest is None:
        raise EngineError(f"no checkpoint at {path} (expected a step directory with {STATE_FILE}, or a save dir with `{LATEST}`)")
    return latest


def _open(path: Path) -> tuple[Path, dict]:
    """state.json of a complete checkpoint of a readable format."""
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
    if state["format"] in (FLAT_FORMAT, FORMAT) and not isinstance(state.get("checksums", {}).get("files"), dict):
        raise EngineError(f"checkpoint file {path / STATE_FILE} is damaged: it has no checksums")
    return path, state


def _verify(path: Path, sums: dict, names: list[str]) -> None:
    for name in names:
        digest = sums[name]
        if isinstance(digest, dict):
            checksums.verify_segments(path / name, digest["segments"])
        else:
            checksums.verify_file(path / name, digest)


def _rng(path: Path) -> dict[str, torch.Tensor]:
    return ckpt_legacy.load_tensors(path / RNG_FILE)


def load(path: Path) -> Checkpoint:
    """Read and verify a checkpoint (a step directory or a save dir) whole, in this process alone."""
    path, state = _open(path)
    if state["format"] in ckpt_legacy.FORMATS:
        master, optim, rng = ckpt_legacy.load(path, state, RNG_FILE)
        return Checkpoint(path, state, rng, master, optim)
    sums = state["checksums"]["files"]
    _verify(path, sums, sorted(sums))
    master, optim, _ = sharded_state.load_whole(path / OPTIM_DIR, state["shapes"])
    return Checkpoint(path, state, _rng(path), master, optim)


def open_to_resume(path: Path, ctx: DistContext) -> Checkpoint:
    """A checkpoint to resume, verified (a collective: each rank checks a share of the files). Formats 3-4 hold
    no tensors yet (`restore` reads this run's shards); formats 1-2 are read whole on every rank."""
    path, state = _open(path)
    if state["format"] in ckpt_legacy.FORMATS:
        master, optim, rng = ckpt_legacy.load(path, state, RNG_FILE)
        return Checkpoint(path, state, rng, master, optim)
    sums = state["checksums"]["files"]
    why = None
    try:
        _verify(path, sums, sorted(sums)[ctx.rank :: ctx.world])
    except EngineError as e:
        why = str(e)
    why = next((w for w in ctx.all_gather_object(why) if w is not None), None)
    if why is not None:
        raise EngineError(why)
    return Checkpoint(path, state, _rng(path))


def restore(loaded: Checkpoint, trainer: Trainer) -> None:
    """The checkpoint's masters, moments and step count into `trainer`, on this run's ranks, ZeRO-1 and
    tensor-parallel layout (a collective for formats 3-4)."""
    if loaded.format in (FLAT_FORMAT, FORMAT):
        sharded_state.load(loaded.path / OPTIM_DIR, trainer, flat=loaded.format == FLAT_FORMAT)
    else:
        trainer.optimizer.load(loaded.master, loaded.optim, int(loaded.state.get("optimizer_steps", loaded.step)))


def dump_state(path: Path, out: Path) -> Path:
    """`dump-state`: a checkpoint's master weights and moments under the training contract's names."""
    loaded = load(path)
    tensors = {f"weight.{k}": v for k, v in loaded.master.items()} | dict(loaded.optim)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / "tensors.safetensors"))
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
