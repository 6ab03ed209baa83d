"""Synthetic corpora: text documents (words drawn with the shipped corpus's word frequencies, so the tokenizer's
word cache sees a realistic Zipf mix) and prepared token sets of a given size written straight in the engine's
shard format (random ids: start-up and the loader never look at token values beyond the range check)."""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

import numpy as np

from train_engine_0_5b.data import shards
from train_engine_0_5b.data.tokenizer import TextTokenizer
from train_engine_0_5b.data.sources import DEFAULT_CORPUS


def text_corpus(path: Path, target_bytes: int, seed: int = 0) -> Path:
    """JSONL of documents of 50-1500 words until the file holds ~target_bytes."""
    texts = [json.loads(line)["text"] for line in gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8")]
    counts = collections.Counter(re.findall(r"\S+", " ".join(texts)))
    words = np.array(list(counts))
    p = np.array(list(counts.values()), dtype=np.float64)
    rng = np.random.default_rng(seed)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target_bytes:
            lengths = rng.integers(50, 1500, 256)
            ids = rng.choice(len(words), size=int(lengths.sum()), p=p / p.sum())
            for piece in np.split(words[ids], np.cumsum(lengths)[:-1]):
                line = json.dumps({"text": " ".join(piece)}) + "\n"
                f.write(line)
                written += len(line)
    return path


def prepared_set(out: Path, target_bytes: int, tokenizer: TextTokenizer | None = None, vocab_size: int | None = None,
                 shard_tokens: int = 1 << 27, seed: int = 0) -> Path:
    """A prepared dataset of ~target_bytes of random tokens (documents of 200-8000 tokens ending in EOS)."""
    tokenizer = tokenizer or TextTokenizer()
    vocab = vocab_size or tokenizer.vocab_size
    dtype = shards.token_dtype(vocab)
    n_total = target_bytes // dtype.itemsize
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    tokenizer.save(out / shards.TOKENIZER_DIR)
    records, index, left = [], 0, n_total
    while left > 0:
        n = min(shard_tokens, left)
        tokens = rng.integers(0, vocab, n, dtype=dtype)
        lengths = rng.integers(200, 8000, n // 200 + 2)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        starts = np.concatenate([starts[starts < n], [n]])
        tokens[starts[1:] - 1] = tokenizer.eos_id
        records.append(shards.write_shard(out, index, tokens, starts))
        index, left = index + 1, left - n
    manifest = shards.Manifest(dtype=dtype.name, vocab_size=vocab, eos_id=tokenizer.eos_id,
                               tokenizer_fingerprint=tokenizer.fingerprint, docs_per_shard=0,
                               sources=[shards.SourceRecord(spec=f"synthetic random tokens, seed {seed}", kind="synthetic")],
                               shards=records, n_tokens=sum(r.n_tokens for r in records),
                               n_docs=sum(r.n_docs for r in records))
    shards.write_manifest(out, manifest)
    return out
