"""Training data: sources (default corpus, local files, Hub) -> tokenizer -> packed rows -> per-rank loader
-> prefetcher (the next steps' batches, built and pinned on a background thread); or pre-batched token ids
(batches.py) -> per-rank loader -> prefetcher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train_engine_0_5b.data.batches import BatchLoader, TokenBatches
from train_engine_0_5b.data.packing import Loader, PackedRows, TokenStream
from train_engine_0_5b.data.prefetch import Prefetcher
from train_engine_0_5b.data.sources import open_source, renderer
from train_engine_0_5b.data.tokenizer import TextTokenizer
from train_engine_0_5b.errors import EngineError


@dataclass
class Data:
    tokenizer: TextTokenizer | None  # None: pre-batched ids for a vocabulary the shipped tokenizer does not fit
    rows: PackedRows | TokenBatches
    source_name: str
    fingerprint: str  # tokens + boundaries + packing settings: what a resume must match

    def loader(self, global_rows: int, rank: int, world: int) -> Loader | BatchLoader:
        if isinstance(self.rows, TokenBatches):
            return BatchLoader(self.rows, rank, world)
        return Loader(self.rows, global_rows, rank, world)

    def describe(self) -> str:
        if isinstance(self.rows, TokenBatches):
            return f"{self.source_name} ({self.rows.input_ids.shape[0]} pre-batched steps)"
        return f"{self.source_name} ({self.rows.tokens_per_epoch:,} tokens/epoch)"


def prepare(dataset: str | None, dataset_config: str | None, split: str, template: str | None, tokenizer_path: str | None,
            seq_length: int, seed: int, shuffle: bool, model_vocab: int) -> Data:
    """Load, check and tokenize; every bad input raises EngineError before any training state exists."""
    tokenizer = TextTokenizer(tokenizer_path)
    if tokenizer.vocab_size > model_vocab:
        raise EngineError(f"the tokenizer in {tokenizer.dir} has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary is {model_vocab}")
    source = open_source(dataset, dataset_config, split)
    stream = TokenStream.build(source, renderer(source, template), tokenizer)
    rows = PackedRows(stream, seq_length, seed, shuffle)
    fingerprint = f"{stream.fingerprint()}-s{seq_length}-seed{seed}-{'shuffle' if shuffle else 'ordered'}"
    return Data(tokenizer, rows, source.name, fingerprint)


def prepare_batches(path: Path, num_steps: int, global_rows: int, seq_length: int, model_vocab: int,
                    tokenizer_path: str | Path | None = None) -> Data:
    """Pre-batched ids (`--token-batches`); the tokenizer (the shipped one by default) travels with checkpoints
    where it fits."""
    batches = TokenBatches(path, num_steps, global_rows, seq_length, model_vocab)
    tokenizer = TextTokenizer(tokenizer_path)
    return Data(tokenizer if tokenizer.vocab_size <= model_vocab else None, batches, f"token batches {path.name}",
                f"batches-{batches.fingerprint}")


__all__ = ["BatchLoader", "TokenBatches", "prepare_batches", "Data", "Loader", "PackedRows", "Prefetcher", "TokenStream", "TextTokenizer", "prepare"]
