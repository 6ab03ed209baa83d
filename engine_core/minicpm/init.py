"""Fresh weights for a MiniCPM model: the one init rule every engine starts from.

The rule: one generator seeded with `seed` draws every matrix whole (torch.randn of its shape) in
hf_param_shapes' order, so the values are the same on every rank and engine for a seed; norms are 1; the
embedding and lm_head are N(0, init_std) with the padding row (pad_token_id) zero; hidden matrices
N(0, init_std / sqrt(hidden / dim_model_base)) (muP's width scaling).

`init_weights` returns every tensor whole. `FreshWeights` offers the same values as a WeightSource
(core/weights.py), so a tensor-parallel rank builds only its shard: a read draws only the row blocks
that overlap its region and skips the rest of the generator's stream. That reproduces the whole draw because
torch's CPU randn of n >= 16 float32 values takes one 32-bit uniform per value, turns each 16-aligned group of 16
into normals within the group (Box-Muller), and when 16 does not divide n redraws the last 16 values from 16
more uniforms; randn over consecutive 16-aligned pieces (the last >= 16 values) thus gives the same values and
leaves the generator where the whole draw would, and a skipped piece costs as many uniforms. The engines'
tests check this bit for bit against the whole draw.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import MiniCPMConfig, hf_param_shapes

BLOCK = 1 << 22  # values per drawn block (16 MiB of float32): a partial read's working memory beyond its result


class FreshWeights:
    """The fresh weights of `cfg` for (`init_std`, `seed`), read tensor by tensor and region by region.

    Reads in hf_param_shapes' order cost one pass over the generator's stream; a read of an earlier tensor
    restarts from where that tensor's draws began (the generator state is kept for every tensor passed)."""

    def __init__(self, cfg: MiniCPMConfig, init_std: float, seed: int, block: int = BLOCK):
        self.cfg, self.init_std, self.block = cfg, init_std, block
        self._shapes = hf_param_shapes(cfg)
        self._names = list(self._shapes)
        self._index = {name: i for i, name in enumerate(self._names)}
        self._gen = torch.Generator().manual_seed(seed)
        self._starts: dict[str, Tensor] = {}  # the generator's state where each passed tensor's draws begin
        self._next = 0  # index of the first tensor whose draws the generator has not passed
        self._scratch = torch.empty(0)

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def _std(self, name: str) -> float:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return self.init_std
        return self.init_std / math.sqrt(self.cfg.hidden_size / self.cfg.dim_model_base)

    @torch.no_grad()
    def read(self, name: str, region: tuple[slice, ...] | None = None) -> Tensor:
        """The `region` (one step-1 slice per dimension; None: all) of tensor `name`, a new float32 tensor."""
        shape = self._shapes[name]
        region = tuple(slice(*s.indices(n)) for s, n in zip(region or (slice(None),) * len(shape), shape))
        if len(shape) == 1:
            return torch.ones(region[0].stop - region[0].start)
        self._seek(self._index[name])
        values = self._draw(shape, region).mul_(self._std(name))
        self._next = self._index[name] + 1
        rows = region[0]
        pad = self.cfg.pad_token_id
        if name == "model.embed_tokens.weight" and pad is not None and rows.start <= pad < rows.stop:
            values[pad - rows.start] = 0.0  # as nn.Embedding(padding_idx) and MiniCPM's init leave it
        return values

    def _seek(self, i: int) -> None:
        """Put the generator where tensor i's draws begin: skip the draws of the tensors before it, or go back
        to its recorded start."""
        names = self._names
        if i < self._next:
            self._gen.set_state(self._starts[names[i]])
            self._next = i
        while True:
            self._starts.setdefault(names[self._next], self._gen.get_state())
            if self._next == i:
                return
            shape = self._shapes[names[self._next]]
            if len(shape) > 1:
                self._draw(shape, (slice(0, 0),) + tuple(slice(0, n) for n in shape[1:]))
            self._next += 1

    def _draw(self, shape: tuple[int, ...], region: tuple[slice, ...]) -> Tensor:
        """The `region` of torch.randn(shape) from the generator (a new tensor), leaving the generator as that
        draw would: the rows in 16-aligned blocks of about `block` values, those outside the region skipped."""
        gen, rows, cols = self._gen, region[0], region[1:]
        width = math.prod(shape[1:])
        n = shape[0] * width
        if n < 16:  # torch's per-value path, which the pieces below do not reproduce
            return torch.randn(shape, generator=gen)[region].clone()
        if all(s.stop - s.start == m for s, m in zip(region, shape)):
            return torch.randn(shape, generator=gen)
        step = 16 // math.gcd(width, 16)  # rows per 16-aligned boundary
        bounds = list(range(0, shape[0], max(step, self.block // width // step * step))) + [shape[0]]
        if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * width < 16:
            del bounds[-2]  # the last piece needs >= 16 values (torch redraws its last 16 when 16 does not divide n)
        out = torch.empty((rows.stop - rows.start,) + tuple(c.stop - c.start for c in cols))
        for r0, r1 in zip(bounds, bounds[1:]):
            a, b = max(r0, rows.start), min(r1, rows.stop)
            count = (r1 - r0) * width
            if a < b:
                piece = torch.randn((r1 - r0,) + tuple(shape[1:]), generator=gen,
                                    out=self._buffer(count).view((r1 - r0,) + tuple(shape[1:])))
                out[a - rows.start : b - rows.start] = piece[(slice(a - r0, b - r0),) + cols]
            else:  # as many 32-bit draws as randn takes: one per value, 16 more for a last piece 16 does not divide
                self._buffer(count + (16 if r1 == shape[0] and n % 16 else 0)).uniform_(generator=gen)
        return out

    def _buffer(self, count: int) -> Tensor:
        """`count` values of one reused scratch tensor: pieces allocated and freed between the regions kept
        would leave holes that the allocator holds on to, raising the RSS well above the share."""
        if self._scratch.numel() < count:
            self._scratch = torch.empty(count)
        return self._scratch[:count]


def init_weights(cfg: MiniCPMConfig, init_std: float, seed: int) -> dict[str, Tensor]:
    """Fresh fp32 weights by HF name, every tensor whole, in hf_param_shapes' order (the module doc's rule)."""
    source = FreshWeights(cfg, init_std, seed)
    return {name: source.read(name) for name in source.names()}
