"""The global sample order of a prepared dataset, a pure function of (seed, index): every rank and node derives
it alone, a resume at step t continues it exactly, and nothing corpus-sized is ever built.

Sample i of a dataset is tokens [i*S, i*S + S + 1) of its token stream (S = seq length; inputs the first S,
labels the last S), N = (tokens - 1) // S samples. A held-out fraction (`eval_split`) is the first K positions of
a permutation keyed by the dataset's content (not the run's seed: the same data always holds out the same
samples); training position q of epoch e = q // (N - K) takes the remaining samples in the order of a
permutation keyed by (seed, e). Both permutations are `Permutation`s: O(1) memory, any index in O(1).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..core.errors import EngineError
from .shards import PreparedSet

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (uint64 -> uint64, a bijection with good avalanche)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def key_of(*parts) -> int:
    """A 64-bit key from any printable parts."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class Permutation:
    """A seeded bijection of [0, n), evaluated per index: numpy has no random-access permutation without an
    n-sized array, so this is a 4-round Feistel network on the smallest even bit width >= log2(n), cycle-walked
    back into [0, n) (at most 4x the domain, a few rounds on average)."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError("a permutation of nothing")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(key_of(key, r)) for r in range(self.ROUNDS)]

    def _once(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        """The images of `idx` (int64 array of values in [0, n))."""
        x = np.asarray(idx, dtype=np.uint64)
        x = self._once(x)
        out = x >= np.uint64(self.n)
        while out.any():  # cycle-walking: a bijection of the 2^bits domain restricted to [0, n)
            x[out] = self._once(x[out])
            out = x >= np.uint64(self.n)
        return x.astype(np.int64)


class SampleOrder:
    """Training and held-out samples of one prepared dataset: `train_rows(q, n)`, `eval_rows(k, n)` as (n, S + 1) int64."""

    def __init__(self, data: PreparedSet, seq_length: int, seed: int, shuffle: bool, eval_split: float):
        self.data, self.seq, self.seed, self.shuffle = data, seq_length, seed, shuffle
        self.n_samples = (data.n_tokens - 1) // seq_length
        self.n_eval = int(round(eval_split * self.n_samples)) if eval_split > 0 else 0
        if eval_split > 0:
            self.n_eval = max(1, self.n_eval)
        self.n_train = self.n_samples - self.n_eval
        if self.n_train < 1:
            raise EngineError(f"prepared dataset {data.path} is empty for this run: {data.n_tokens} tokens make "
                              f"{self.n_samples} sample(s) of --seq-length {seq_length} + 1, {self.n_eval} held out "
                              "(--eval-split); it needs at least one training sample")
        self._split = Permutation(self.n_samples, key_of("split", data.manifest.id)) if self.n_eval else None
        self._epoch_perms: dict[int, Permutation] = {}

    def _epoch(self, e: int) -> Permutation:
        if e not in self._epoch_perms:
            if len(self._epoch_perms) > 2:  # positions move forward: keep a few epochs
                self._epoch_perms.pop(min(self._epoch_perms))
            self._epoch_perms[e] = Permutation(self.n_train, key_of("epoch", self.seed, e))
        return self._epoch_perms[e]

    def train_samples(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids of training positions (any non-negative int64; epochs follow one another)."""
        epoch, within = np.divmod(positions, self.n_train)
        out = np.empty_like(within)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self._epoch(int(e))(within[sel]) if self.shuffle else within[sel]
        return self._split(out + self.n_eval) if self._split is not None else out

    def eval_samples(self, positions: np.ndarray) -> np.ndarray:
        if self._split is None:
            raise EngineError(f"prepared dataset {self.data.path} holds nothing out (--eval-split 0)")
        return self._split(positions % self.n_eval)

    def read(self, samples: np.ndarray) -> np.ndarray:
        """Rows of these sample ids: (n, S + 1) int64."""
        out = np.empty((len(samples), self.seq + 1), dtype=np.int64)
        ids = samples.tolist()
        for i in ids:
            self.data.prefetch(i * self.seq, self.seq + 1)
        for row, i in enumerate(ids):
            self.data.tokens(i * self.seq, self.seq + 1, out[row])
        return out

    def train_rows(self, first: int, n: int) -> np.ndarray:
        return self.read(self.train_samples(np.arange(first, first + n, dtype=np.int64)))

    def eval_rows(self, first: int, n: int) -> np.ndarray:
        return self.read(self.eval_samples(np.arange(first, first + n, dtype=np.int64)))
