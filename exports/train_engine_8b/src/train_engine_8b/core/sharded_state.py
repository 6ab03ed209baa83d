"""The optimizer's state as a torch.distributed.checkpoint (DCP) state dict: every rank saves its own part,
and a checkpoint written by N ranks loads on M, ZeRO-1 or not (DCP reads the overlapping ranges).

Keys: `master.NAME`, `exp_avg.NAME`, `exp_avg_sq.NAME` (each flattened to 1-D) and `step_count`. Without
ZeRO-1 a value is the whole tensor, the same on every rank (DCP writes one copy). With ZeRO-1 it is this
rank's pieces (dist.Piece: a contiguous, uneven, possibly empty range of the flattened parameter) as a 1-D
ShardedTensor: a DTensor Shard(0) describes only even chunks, which the reducer's bucket slices are not.
The values are the optimizer's own tensors, so `dcp.load` fills them in place.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor

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


def save(path: Path, trainer: Trainer) -> None:
    """Every rank writes its part of the optimizer state under `path` (a collective)."""
    dcp.save(state_dict(trainer.optimizer), checkpoint_id=str(path))


@torch.no_grad()
def load(path: Path, trainer: Trainer) -> None:
    """The optimizer state saved under `path`, on this run's ranks and sharding; the compute-dtype
    parameters follow the loaded masters (a collective)."""
    opt = trainer.optimizer
    state = state_dict(opt)
    dcp.load(state, checkpoint_id=str(path))
    opt.step_count = int(state["step_count"])
    if not opt.shared:
        torch._foreach_copy_(opt._copies(), opt.master)
    if opt.units is not None:
        trainer.reducer.gather_params()
