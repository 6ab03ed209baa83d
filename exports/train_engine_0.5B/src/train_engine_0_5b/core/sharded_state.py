"""The optimizer's state as a torch.distributed.checkpoint (DCP) state dict: every rank saves its own part,
and a checkpoint written by N ranks loads on M, ZeRO-1 or not, at any tensor-parallel degree (DCP reads the
overlapping ranges).

Keys: `master.NAME`, `exp_avg.NAME`, `exp_avg_sq.NAME`, each in the parameter's global shape, and
`step_count`. A value this rank holds whole (no ZeRO-1, the parameter not TP-sharded) is the tensor itself,
the same on every rank (DCP writes one copy). Otherwise it is this rank's ranges as a ShardedTensor of
rectangles in the global coordinates: a ZeRO-1 piece (dist.Piece: a contiguous, uneven, possibly empty range
of the flattened local shard) is at most three rectangles (a partial row, whole rows, a partial row), placed
at the local shard's offset in the parameter (tensor_parallel.py). A DTensor Shard(0) describes only even
chunks, which neither the pieces nor their rows are. Replicated parts (a norm weight on every TP rank) are
written once (DCP deduplicates equal chunks). The values are the optimizer's own tensors (views), so
`dcp.load` fills them in place. `load_whole` reads a saved state back as whole tensors in one process
(export-hf, dump-state), whatever wrote it.

`flat=True` is checkpoint format 3's layout: every key flattened to 1-D (written before tensor parallelism;
read only, and only into a model without it).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from .optim import AdamW
from .tensor_parallel import is_sharded, local, offset
from .trainer import Trainer

KINDS = ("master", "exp_avg", "exp_avg_sq")
Chunk = tuple[tuple[int, ...], tuple[int, ...], Tensor]  # global offsets, sizes, the values (a view)


def rectangles(start: int, end: int, values: Tensor, shape: tuple[int, ...], at: tuple[int, ...]) -> list[Chunk]:
    """Elements [start, end) of a flattened tensor of `shape` (1-D or 2-D) whose values are `values` (1-D), as
    rectangles offset by `at` (where that tensor sits in the whole one)."""
    if len(shape) == 1:
        return [((at[0] + start,), (end - start,), values)] if end > start else []
    if len(shape) != 2:
        raise ValueError(f"sharded optimizer state of a {len(shape)}-D parameter is not supported (1-D or 2-D)")
    cols, out, i = shape[1], [], start
    while i < end:
        row, col = divmod(i, cols)
        n = (end - i) // cols * cols if col == 0 and end - i >= cols else min(cols - col, end - i)
        rows = n // cols if col == 0 and n >= cols else 1
        part = values[i - start : i - start + n].view(rows, n // rows)
        out.append(((at[0] + row, at[1] + col), (rows, n // rows), part))
        i += n
    return out


def _sharded(chunks: list[Chunk], size: tuple[int, ...], dtype: torch.dtype, others: list[tuple[int, tuple, tuple]]):
    """This rank's chunks of a tensor of `size` as a ShardedTensor. `others`: (rank, offsets, sizes) of the
    other ranks' chunks; replicas of this rank's chunks are left out of the global metadata (a chunk is either
    equal to another rank's or disjoint from it), so the shards cover the tensor once."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    rank = dist.get_rank()
    shards = [Shard(t, ShardMetadata(list(o), list(n), f"rank:{rank}/{t.device}")) for o, n, t in chunks]
    seen = {(tuple(o), tuple(n)) for o, n, _ in chunks}
    rest = []
    for r, o, n in sorted(others):
        if (o, n) not in seen:
            seen.add((o, n))
            rest.append(ShardMetadata(list(o), list(n), f"rank:{r}/{chunks[0][2].device}"))
    meta = ShardedTensorMetadata([s.metadata for s in shards] + rest, torch.Size(size), TensorProperties(dtype=dtype))
    with warnings.catch_warnings():  # ShardedTensor's deprecation notice: it is DCP's type for uneven ranges
        warnings.simplefilter("ignore")
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta)


def state_dict(opt: AdamW, flat: bool = False) -> dict[str, object]:
    """DCP state dict over the optimizer's own tensors (see the module doc); a collective when any value is
    sharded (the ranks exchange their chunks' coordinates). A key of which this rank holds nothing (a ZeRO-1
    rank without a piece of it) is left out."""
    tensors = dict(zip(KINDS, (opt.master, opt.exp_avg, opt.exp_avg_sq)))
    params = dict(zip(opt.names, opt.params))
    units = opt.units or [(n, 0, local(p).numel()) for n, p in params.items()]
    out: dict[str, object] = {}
    mine: dict[str, list[Chunk]] = {}
    for kind, ts in tensors.items():
        for (n, a, b), t in zip(units, ts):
            p = params[n]
            if flat and is_sharded(p):
                raise ValueError(f"checkpoint format 3 (flattened) cannot be read into tensor-parallel {n}")
            if opt.units is None and not is_sharded(p):  # held whole by every rank
                out[f"{kind}.{n}"] = t.view(-1) if flat else t
                continue
            shape, at = (local(p).numel(),), (0,)
            if not flat:
                shape, at = tuple(local(p).shape), offset(p)
            mine.setdefault(f"{kind}.{n}", []).extend(rectangles(a, b, t.view(-1), shape, at))
    if opt.units is not None or any(is_sharded(p) for p in opt.params):  # the same answer on every rank
        coords = {k: [(o, n) for o, n, _ in cs] for k, cs in mine.items()}
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, coords)
        rank = dist.get_rank()
        for key, chunks in mine.items():
            if not chunks:
                continue
            n = key.split(".", 1)[1]
            size = (params[n].numel(),) if flat else tuple(params[n].shape)
            others = [(r, tuple(o), tuple(z)) for r, theirs in enumerate(everyone) if r != rank
                      for o, z in theirs.get(key, [])]
            out[key] = _sharded(chunks, size, chunks[0][2].dtype, others)
    out["step_count"] = torch.tensor(opt.step_count)
    return out


def shapes(opt: AdamW) -> dict[str, list[int]]:
    """Every parameter's shape (the state dict holds them flattened)."""
    return {n: list(p.shape) for n, p in zip(opt.names, opt.params)}


def save(path: Path, trainer: Trainer) -> Metadata:
    """Every rank writes its part of the optimizer state under `path` (a collective); returns DCP's
    metadata (which file holds which tensor's bytes), the same on every rank."""
    return save_optimizer(path, trainer.optimizer)


def save_optimizer(path: Path, opt: AdamW) -> Metadata:
    """`save` for an optimizer alone (one process, or every rank); the metadata as written to `path`."""
    with _alone():
        dcp.save(state_dict(opt), checkpoint_id=str(path), no_dist=not dist.is_initialized())
    # read back: the Metadata dcp.save returns has no storage_data on torch 2.11 (2.13's has)
    return FileSystemReader(str(path)).read_metadata()


@contextmanager
def _alone() -> Iterator[None]:
    """DCP warns that it assumes one process whenever it runs without a process group, as is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_whole(path: Path, shapes: dict[str, list[int]]) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """In this process alone: (masters by name, moments as exp_avg.NAME / exp_avg_sq.NAME, step count), as whole
    tensors of `shapes`, from a state saved by any number of ranks, sharded or not."""
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    dtype = lambda key: saved[key].properties.dtype if key in saved else torch.float32  # noqa: E731 (a missing key: dcp.load names it)
    size = lambda key, s: tuple(saved[key].size) if key in saved else (math.prod(s),)  # noqa: E731 (format 3: flattened)
    whole: dict[str, Tensor] = {f"{kind}.{n}": torch.empty(size(f"{kind}.{n}", s), dtype=dtype(f"{kind}.{n}"))
                                for kind in KINDS for n, s in shapes.items()}
    whole["step_count"] = torch.tensor(0)
    with _alone():
        dcp.load(whole, checkpoint_id=str(path), no_dist=True)
    step = int(whole.pop("step_count"))
    tensors = {k: v.view(shapes[k.split(".", 1)[1]]) for k, v in whole.items()}
    master = {k.removeprefix("master."): v for k, v in tensors.items() if k.startswith("master.")}
    return master, {k: v for k, v in tensors.items() if not k.startswith("master.")}, step


@torch.no_grad()
def load(path: Path, trainer: Trainer, flat: bool = False) -> None:
    """The optimizer state saved under `path` (`flat`: format 3's layout), on this run's ranks, ZeRO-1 and
    tensor-parallel sharding; the compute-dtype parameters follow the loaded masters (a collective)."""
    opt = trainer.optimizer
    state = state_dict(opt, flat)
    with _alone():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    opt.step_count = int(state["step_count"])
    if not opt.shared:
        torch._foreach_copy_(opt._copies(), opt.master)
    if opt.units is not None:
        trainer.reducer.gather_params()
