"""Prepared datasets mixed with weights (`--prepared-data A --prepared-data B --data-weights 0.7,0.3`), and the
held-out rows for validation.

Global sample g lies in block g // B. Each block holds round(w_c * B) samples of component c (largest
remainders, so they sum to B), in an order permuted by (seed, block); component c's k-th sample is its own
training position k (sampler.py: each component runs its own epochs). So proportions are exact to 1/B in
every block, any g is computed in O(B) without looking at earlier blocks, and a resume is exact.

Weights must sum to 1 (within 1e-6): they are refused otherwise, never normalized, so a typo cannot quietly
change a recipe; the message gives the normalized weights to paste.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from ..core.errors import EngineError
from .sampler import SampleOrder
from .shards import Manifest, PreparedSet

MIN_BLOCK = 1024
WEIGHT_TOLERANCE = 1e-6


def check_weights(paths: list[Path], weights: list[float] | None) -> list[float]:
    """One weight per dataset, each > 0, summing to 1 (refused otherwise); none given: one dataset, weight 1."""
    if weights is None or len(weights) == 0:
        if len(paths) > 1:
            raise EngineError(f"{len(paths)} --prepared-data sets need --data-weights (one per set, summing to 1)")
        return [1.0]
    if len(weights) != len(paths):
        raise EngineError(f"--data-weights has {len(weights)} value(s) for {len(paths)} --prepared-data set(s)")
    for p, w in zip(paths, weights):
        if not (math.isfinite(w) and w > 0):
            raise EngineError(f"--data-weights: the weight of {p} is {w}; every weight must be > 0 (drop a set to leave it out)")
    total = math.fsum(weights)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        normalized = ",".join(f"{w / total:.6g}" for w in weights)
        raise EngineError(f"--data-weights sum to {total:.6g}, not 1; they are not normalized for you. "
                          f"Normalized, they would be --data-weights {normalized}")
    return list(weights)


def block_counts(weights: list[float]) -> np.ndarray:
    """Samples per component in one block: largest remainders of w * B, B large enough that each gets >= 1."""
    block = max(MIN_BLOCK, math.ceil(4 / min(weights)))
    raw = np.array(weights) * block
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: block - counts.sum()]] += 1
    return counts


class MixtureRows:
    """Row g of the run's global sample stream (`rows(first, n)` -> (n, S + 1) int64), over weighted components."""

    def __init__(self, components: list[SampleOrder], weights: list[float], seed: int):
        self.components, self.weights, self.seed = components, weights, seed
        self.seq, self.shuffle = components[0].seq, components[0].shuffle
        self.counts = block_counts(weights)
        self.block = int(self.counts.sum())
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def tokens_per_epoch(self) -> int:
        return sum(c.n_train * c.seq for c in self.components)

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b: each slot's component and its rank among that component's slots in the block."""
        if b not in self._layouts:
            comp = np.repeat(np.arange(len(self.counts)), self.counts)
            comp = comp[np.random.default_rng([self.seed, b]).permutation(self.block)]
            rank = np.empty(self.block, dtype=np.int64)
            for c in range(len(self.counts)):
                sel = comp == c
                rank[sel] = np.arange(int(sel.sum()))
            if len(self._layouts) > 4:
                self._layouts.pop(min(self._layouts))
            self._layouts[b] = (comp, rank)
        return self._layouts[b]

    def assign(self, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(component, that component's training position) of global samples first .. first+n-1."""
        g = np.arange(first, first + n, dtype=np.int64)
        if len(self.components) == 1:
            return np.zeros(n, dtype=np.int64), g
        block, slot = np.divmod(g, self.block)
        comp, pos = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        for b in np.unique(block):
            sel = block == b
            c, r = self._layout(int(b))
            comp[sel] = c[slot[sel]]
            pos[sel] = int(b) * self.counts[c[slot[sel]]] + r[slot[sel]]
        return comp, pos

    def rows(self, first: int, n: int) -> np.ndarray:
        comp, pos = self.assign(first, n)
        out = np.empty((n, self.seq + 1), dtype=np.int64)
        for c in np.unique(comp):
            sel = comp == c
            order = self.components[int(c)]
            out[sel] = order.read(order.train_samples(pos[sel]))
        return out


class EvalRows:
    """Held-out rows (`rows(first, n)`): each component's held-out samples in turn (their weights do not matter:
    the eval loss is of all of them), or a separate prepared set's samples in order."""

    def __init__(self, orders: list[SampleOrder], separate: bool):
        self.orders, self.separate = orders, separate
        self.seq = orders[0].seq
        self.sizes = [o.n_samples if separate else o.n_eval for o in orders]
        self.total = sum(self.sizes)

    def rows(self, first: int, n: int) -> np.ndarray:
        idx = np.arange(first, first + n, dtype=np.int64) % self.total
        bounds = np.cumsum([0, *self.sizes])
        comp = np.searchsorted(bounds, idx, side="right") - 1
        out = np.empty((n, self.seq + 1), dtype=np.int64)
        for c in np.unique(comp):
            sel, order = comp == c, self.orders[int(c)]
            local = idx[sel] - bounds[c]
            out[sel] = order.read(local) if self.separate else order.read(order.eval_samples(local))
        return out


def fingerprint(manifests: list[Manifest], weights: list[float], seq_length: int, seed: int, shuffle: bool,
                eval_split: float) -> str:
    """What a resume must match: the sets' content, weights and every setting of the order."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(([m.id for m in manifests], weights, seq_length, seed, shuffle, eval_split)).encode())
    return f"prepared-{h.hexdigest()}"


def open_sets(paths: list[Path]) -> list[PreparedSet]:
    return [PreparedSet.open(p) for p in paths]
