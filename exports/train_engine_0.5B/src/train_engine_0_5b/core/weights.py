"""Initial master weights that each rank reads only its part of (issue 29: `--init-from` and fresh inits at 8B size).

`WeightSource` is what a lazily read checkpoint offers (minicpm/init_from.py's `HFWeights`: safetensors read
slice by slice through their metadata) and a fresh init too (minicpm/init.py's `FreshWeights`: a region's rows
drawn from the generator's stream, the rest skipped): the names, each tensor's whole shape, and
`read(name, region)`, a rectangle of one tensor in float32. `local_masters` gives every parameter of a built
model its initial values from a source, reading only the rectangle this rank holds (`tensor_parallel.region`:
the whole tensor for a plain parameter or a replicated DTensor, its shard for a sharded one), so no rank ever
holds the whole model. Both engines' `build_trainer` call it; a dict of whole tensors already in memory (a
checkpoint's or a probe case's masters) passes through unchanged and AdamW takes each rank's shard of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from .errors import EngineError
from .tensor_parallel import region

Region = tuple[slice, ...]


@runtime_checkable
class WeightSource(Protocol):
    """Whole tensors by name, read in parts."""

    def names(self) -> list[str]:
        """Every tensor's name, in the model's order."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The whole tensor's shape (no data read)."""
        ...

    def read(self, name: str, region: Region | None = None) -> Tensor:
        """The `region` (one slice per dimension, step 1; None: all of it) of tensor `name` in float32; raises
        EngineError naming what is wrong with what it read."""
        ...


Initial = Mapping[str, Tensor] | WeightSource


def local_masters(initial: Initial, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Initial master weights for AdamW (core/optim.py) of the model whose parameters are `params`.

    A dict of whole tensors is returned as it is (AdamW takes each rank's shard of it). From a WeightSource,
    each parameter's local rectangle is read: a plain tensor for a plain parameter, a DTensor wrapping the
    local shard for a DTensor one (AdamW takes it as this rank's shard; no communication). Every rank calls
    this together when the world has more than one: a read error on one rank (e.g. a non-finite value in its
    shard only) is raised on every rank with that rank's message, not left to hang the others' collectives."""
    if not isinstance(initial, WeightSource):
        return initial
    out: dict[str, Tensor] = {}
    error = None
    try:
        for name, p in params.items():
            values = initial.read(name, region(p))
            out[name] = (DTensor.from_local(values, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                            stride=p.stride()) if isinstance(p, DTensor) else values)
    except EngineError as e:
        error = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        if error is None:
            error = next((f"{e} (read on rank {r})" for r, e in enumerate(errors) if e is not None), None)
    if error is not None:
        raise EngineError(error)
    return out
