"""The optimizer's state as a torch.distributed.checkpoint (DCP) state dict: every rank saves its own part,
and a checkpoint written by N ranks loads on M, ZeRO-1 or not (DCP reads the overlapping ranges).

Keys: `master.NAME`, `exp_avg.NAME`, `exp_avg_sq.NAME` (each flattened to 1-D) and `step_count`. Without
ZeRO-1 a value is the whole tensor, the same on every rank (DCP writes one copy). With ZeRO-1 it is this
rank's pieces (dist.Piece: a contiguous, uneven, possibly empty range of the flattened parameter) as a 1-D
ShardedTensor: a DTensor Shard(0) describes only even chunks, which the reducer's bucket slices are not.
The values are the optimizer's own tensors, so `dcp.load` fills them in place. `load_whole` reads a saved
state back as whole tensors in one process (export-hf, dump-state), whatever wrote it.
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
from .trainer import Trainer

KINDS = ("master", "exp_avg", "exp_avg_sq")


def _sharded(pieces: list[tuple[int, int, Tensor]], numel: int, rank: int):
    """This rank's [start, end) ranges of a flattened tensor of `numel` elements, as a ShardedTensor."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    shards = [Shard(t, ShardMetadata([a], [b - a], f"rank:{rank}/{t.device}")) for a, b, t in pieces]
    with warnings.catch_warnings():  # ShardedTensor's deprecation notice: it is DCP's type for uneven ranges
        warnings.simplefilter("ignore")
        return init_from_local_shards(shards, [numel])


def state_dict(opt: AdamW) -> dict[str, object]:
    """DCP state dict over the optimizer's own tensors (see the module doc)."""
    tensors = dict(zip(KINDS, (opt.master, opt.exp_avg, opt.exp_avg_sq)))
    out: dict[str, object] = {}
    if opt.units is None:
        for kind, ts in tensors.items():
            out |= {f"{kind}.{n}": t.view(-1) for n, t in zip(opt.names, ts)}
    else:
        numel = {n: p.numel() for n, p in zip(opt.names, opt.params)}
        rank = dist.get_rank()
        for kind, ts in tensors.items():
            mine: dict[str, list] = {n: [] for n in opt.names}
            for (n, a, b), t in zip(opt.units, ts):
                mine[n].append((a, b, t.view(-1)))
            out |= {f"{kind}.{n}": _sharded(mine[n], numel[n], rank) for n in opt.names}
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
    """`save` for an optimizer alone (one process, or every rank)."""
    with _alone():
        return dcp.save(state_dict(opt), checkpoint_id=str(path), no_dist=not dist.is_initialized())


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
    whole: dict[str, Tensor] = {f"{kind}.{n}": torch.empty(math.prod(s), dtype=dtype(f"{kind}.{n}"))
                                for kind in KINDS for n, s in shapes.items()}
    whole["step_count"] = torch.tensor(0)
    with _alone():
        dcp.load(whole, checkpoint_id=str(path), no_dist=True)
    step = int(whole.pop("step_count"))
    tensors = {k: v.view(shapes[k.split(".", 1)[1]]) for k, v in whole.items()}
    master = {k.removeprefix("master."): v for k, v in tensors.items() if k.startswith("master.")}
    return master, {k: v for k, v in tensors.items() if not k.startswith("master.")}, step


@torch.no_grad()
def load(path: Path, trainer: Trainer) -> None:
    """The optimizer state saved under `path`, on this run's ranks and sharding; the compute-dtype
    parameters follow the loaded masters (a collective)."""
    opt = trainer.optimizer
    state = state_dict(opt)
    with _alone():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    opt.step_count = int(state["step_count"])
    if not opt.shared:
        torch._foreach_copy_(opt._copies(), opt.master)
    if opt.units is not None:
        trainer.reducer.gather_params()
