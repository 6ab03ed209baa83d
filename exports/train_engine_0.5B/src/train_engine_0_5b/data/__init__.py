"""Training data: sources (default corpus, local files, Hub) -> tokenizer -> packed rows -> per-rank loader
-> prefetcher (the next steps' batches, built and pinned on a background thread)."""

from __future__ import annotations

from dataclasses import dataclass

from train_engine_0_5b.data.packing import Loader, PackedRows, TokenStream
from train_engine_0_5b.data.prefetch import Prefetcher
from train_engine_0_5b.data.sources import open_source, renderer
from train_engine_0_5b.data.tokenizer import TextTokenizer
from train_engine_0_5b.errors import EngineError


@dataclass
class Data:
    tokenizer: TextTokenizer
    rows: PackedRows
    source_name: str
    fingerprint: str  # tokens + boundaries + packing settings: what a resume must match


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


__all__ = ["Data", "Loader", "PackedRows", "Prefetcher", "TokenStream", "TextTokenizer", "prepare"]
