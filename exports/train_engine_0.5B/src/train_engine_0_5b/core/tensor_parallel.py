"""What the core needs to know about tensor-parallel parameters (DTensors from torch.distributed.tensor).

The core works on each rank's local shard: the reducer sums local gradients over the data-parallel group, the
optimizer keeps masters and moments of the local shard (and of its ZeRO-1 pieces), checkpoints write the local
shard's ranges in the parameter's global coordinates. A plain tensor is its own local shard at offset 0, so
every function here is the identity on a model without tensor parallelism.

Shard placements must split evenly (the engines' parallelize.py refuses degrees that do not divide a size).
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def local(p: Tensor) -> Tensor:
    """The tensor holding this rank's values of `p`, outside autograd (writes to it change `p`)."""
    return p._local_tensor if isinstance(p, DTensor) else p.data


def is_sharded(p: Tensor) -> bool:
    """Whether ranks hold different parts of `p` (some Shard placement); a replicated DTensor is not."""
    return isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)


def offset(p: Tensor) -> tuple[int, ...]:
    """Where this rank's local shard starts in `p`'s global coordinates."""
    if not isinstance(p, DTensor):
        return (0,) * p.ndim
    return tuple(compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1])


def region(p: Tensor) -> tuple[slice, ...]:
    """Where this rank's local shard of `p` lies in `p`'s global coordinates, one slice per dimension (the whole
    tensor for a plain tensor or a replicated DTensor)."""
    if not isinstance(p, DTensor):
        return tuple(slice(0, n) for n in p.shape)
    shape, start = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(a, a + n) for a, n in zip(start, shape))


def shard_of(full: Tensor, p: Tensor) -> Tensor:
    """This rank's part of `full` (a whole tensor of `p`'s global shape), a view. A DTensor `full` laid out as
    `p` already is this rank's part (weights.local_masters): its local tensor."""
    if isinstance(full, DTensor):
        if not isinstance(p, DTensor) or tuple(full.placements) != tuple(p.placements) or full.shape != p.shape:
            raise ValueError(f"a DTensor of shape {tuple(full.shape)} {full.placements} is not laid out as the "
                             f"parameter ({tuple(p.shape)} {getattr(p, 'placements', 'plain')})")
        return full.to_local()
    return full if not isinstance(p, DTensor) else full[region(p)]


def whole(local_values: Tensor, p: Tensor) -> Tensor:
    """`local_values` (shaped as `p`'s local shard) assembled over `p`'s mesh into the whole tensor (a
    collective over that mesh when `p` is sharded)."""
    if not is_sharded(p):
        return local_values
    return DTensor.from_local(local_values, p.device_mesh, p.placements, run_check=False).full_tensor()


def local_grad(p: Tensor) -> Tensor:
    """`p.grad`'s local values laid out as `p` (a partial sum, e.g. a sequence-parallel norm weight's, is
    all-reduced over the TP group first; a replicated gradient of a sharded parameter is sliced)."""
    g = p.grad
    if not isinstance(g, DTensor):
        return g
    if tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    return g.to_local()


def repoint(p: Tensor, storage: Tensor) -> None:
    """Make `p`'s local values live in `storage` (same shape, its values already copied)."""
    if isinstance(p, DTensor):
        p._local_tensor.data = storage
    else:
        p.data = storage
