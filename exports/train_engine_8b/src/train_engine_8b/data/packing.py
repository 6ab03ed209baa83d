"""Tokenized documents packed into training rows, with an exact resume cursor.

Every document is encoded and followed by EOS; the documents of epoch e, in the order of a
permutation seeded by (seed, e) (or in dataset order without shuffling), form one token stream,
and epochs follow one another without a gap. Row j is tokens [j*S, j*S + S + 1) of that endless
stream (S = seq length): inputs are its first S tokens, labels its last S, so consecutive rows
share one token and none is wasted; a row may span documents (no cross-document masking, as
Megatron pretrains) and epochs.

Step t's global batch is rows [t*G, (t+1)*G) (G rows); rank r of W takes the contiguous slice
[t*G + r*G/W, t*G + (r+1)*G/W). A row's content depends only on its index, so the cursor is the
step: resuming at step t reproduces the same rows on any number of ranks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..core.errors import EngineError
from .sources import Source
from .tokenizer import TextTokenizer


@dataclass
class TokenStream:
    """All documents of one epoch in dataset order: flat tokens and each document's start (n_docs + 1)."""

    tokens: np.ndarray  # int32
    starts: np.ndarray  # int64

    @classmethod
    def build(cls, source: Source, render, tokenizer: TextTokenizer) -> "TokenStream":
        pieces: list[np.ndarray] = []
        for batch in source.batches():
            texts = [t for t in render(batch) if t.strip()]  # an empty document would be a lone EOS
            for ids in tokenizer.encode_batch(texts):
                pieces.append(np.asarray([*ids, tokenizer.eos_id], dtype=np.int32))
        if not pieces:
            raise EngineError(f"dataset {source.name} has no text: all {source.num_rows} documents are empty")
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        return cls(np.concatenate(pieces), np.concatenate([[0], np.cumsum(lengths)]))

    @property
    def num_docs(self) -> int:
        return len(self.starts) - 1

    def fingerprint(self) -> str:
        """Identifies the tokens and their document boundaries (a resume must see the same stream)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.tokens.tobytes())
        h.update(self.starts.tobytes())
        return h.hexdigest()


class PackedRows:
    """Row j of the endless multi-epoch stream, as (n, S + 1) int64 arrays."""

    def __init__(self, stream: TokenStream, seq_length: int, seed: int, shuffle: bool):
        self.stream, self.seq, self.seed, self.shuffle = stream, seq_length, seed, shuffle
        self._lengths = np.diff(stream.starts)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.stream.tokens)

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start of each ordered document in the epoch's stream)."""
        if e not in self._epochs:
            n = self.stream.num_docs
            order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
            cum = np.concatenate([[0], np.cumsum(self._lengths[order])])
            if len(self._epochs) > 2:  # rows move forward: keep a few epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (order, cum)
        return self._epochs[e]

    def rows(self, first: int, n: int) -> np.ndarray:
        """Rows first .. first+n-1: (n, S + 1)."""
        pos = (first + np.arange(n, dtype=np.int64))[:, None] * self.seq + np.arange(self.seq + 1, dtype=np.int64)
        epoch, within = np.divmod(pos, self.tokens_per_epoch)
        out = np.empty(pos.shape, dtype=np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            order, cum = self._epoch(int(e))
            doc = np.searchsorted(cum, within[sel], side="right") - 1
            out[sel] = self.stream.tokens[self.stream.starts[order[doc]] + within[sel] - cum[doc]]
        return out


class Loader:
    """This rank's rows of each step, as (input_ids, labels) int64 tensors (rows, S)."""

    def __init__(self, rows: PackedRows, global_rows: int, rank: int, world: int):
        if global_rows % world:
            raise EngineError(f"global batch of {global_rows} rows does not split over {world} ranks")
        self.rows, self.global_rows, self.rank, self.local_rows = rows, global_rows, rank, global_rows // world

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        r = self.rows.rows(step * self.global_rows + self.rank * self.local_rows, self.local_rows)
        return torch.from_numpy(r[:, :-1].copy()), torch.from_numpy(r[:, 1:].copy())

    def cursor(self, step: int) -> dict:
        """What a checkpoint records: where the next step starts in the stream."""
        return {"next_step": step, "rows_consumed": step * self.global_rows, "global_rows": self.global_rows,
                "seq_length": self.rows.seq, "seed": self.rows.seed, "shuffle": self.rows.shuffle}
