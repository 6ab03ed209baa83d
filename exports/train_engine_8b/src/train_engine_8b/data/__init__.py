"""Training data, one of three: sources (default corpus, local files, Hub) -> tokenizer -> packed rows, for
small data tokenized at start-up; prepared datasets (prepare_data.py writes them once, shards.py reads them by
memmap, sampler.py orders their samples, mixture.py mixes several and holds rows out for validation); or
pre-batched token ids (batches.py). Then a per-rank loader -> prefetcher (the next steps' batches, built and
pinned on a background thread)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import EngineError
from .batches import BatchLoader, TokenBatches
from .mixture import EvalRows, MixtureRows, check_weights, fingerprint
from .packing import Loader, PackedRows, TokenStream
from .prefetch import Prefetcher
from .sampler import SampleOrder
from .shards import TOKENIZER_DIR, PreparedSet
from .sources import open_source, renderer
from .tokenizer import TextTokenizer


@dataclass
class Data:
    tokenizer: TextTokenizer | None  # None: pre-batched ids for a vocabulary the shipped tokenizer does not fit
    rows: PackedRows | MixtureRows | TokenBatches
    source_name: str
    fingerprint: str  # tokens + boundaries + packing settings: what a resume must match
    eval_rows: EvalRows | None = None  # held-out rows (`rows(first, n)`), when the run validates

    def loader(self, global_rows: int, rank: int, world: int) -> Loader | BatchLoader:
        if isinstance(self.rows, TokenBatches):
            return BatchLoader(self.rows, rank, world)
        return Loader(self.rows, global_rows, rank, world)

    def eval_loader(self, global_rows: int, rank: int, world: int) -> Loader | None:
        """Batch i of a validation: held-out rows [i*G, (i+1)*G), this rank's slice."""
        return Loader(self.eval_rows, global_rows, rank, world) if self.eval_rows is not None else None

    def describe(self) -> str:
        if isinstance(self.rows, TokenBatches):
            return f"{self.source_name} ({self.rows.input_ids.shape[0]} pre-batched steps)"
        held = f"; validation on {self.eval_rows.total:,} held-out samples" if self.eval_rows is not None else ""
        return f"{self.source_name} ({self.rows.tokens_per_epoch:,} tokens/epoch{held})"


def _tokenizer_for(sets: list[PreparedSet], tokenizer_path: str | Path | None, model_vocab: int) -> TextTokenizer:
    """The run's tokenizer, which must be the one every prepared set was tokenized with (default: their copy)."""
    for ps in sets:
        m = ps.manifest
        if m.vocab_size > model_vocab:
            raise EngineError(f"prepared dataset {ps.path} was tokenized with a vocabulary of {m.vocab_size} tokens; "
                              f"the model's vocabulary is {model_vocab} (prepare it again with the model's tokenizer)")
    first = sets[0]
    for ps in sets[1:]:
        if ps.manifest.tokenizer_fingerprint != first.manifest.tokenizer_fingerprint:
            raise EngineError(f"prepared datasets {first.path} and {ps.path} were tokenized with different tokenizers "
                              f"({first.manifest.tokenizer_fingerprint} vs {ps.manifest.tokenizer_fingerprint}); "
                              "a run reads one tokenizer's ids")
    tokenizer = TextTokenizer(tokenizer_path if tokenizer_path is not None else first.path / TOKENIZER_DIR)
    if tokenizer.fingerprint != first.manifest.tokenizer_fingerprint:
        raise EngineError(f"the run's tokenizer ({tokenizer.dir}, {tokenizer.fingerprint}) is not the one prepared "
                          f"dataset {first.path} was tokenized with ({first.manifest.tokenizer_fingerprint}); drop "
                          f"--tokenizer-path to use the set's own copy ({first.path / TOKENIZER_DIR})")
    return tokenizer


def open_prepared(paths: list[str], weights: list[float] | None, eval_data: str | None, eval_split: float,
                  tokenizer_path: str | Path | None, seq_length: int, seed: int, shuffle: bool, model_vocab: int) -> Data:
    """Prepared datasets, mixed and with their held-out rows; checks every set's manifest, shard sizes and
    tokenizer (O(shards), never O(tokens)) before any training state exists."""
    set_paths = [Path(p) for p in paths]
    weights = check_weights(set_paths, weights)
    sets = [PreparedSet.open(p) for p in set_paths]
    eval_set = PreparedSet.open(Path(eval_data)) if eval_data is not None else None
    tokenizer = _tokenizer_for(sets + ([eval_set] if eval_set is not None else []), tokenizer_path, model_vocab)
    orders = [SampleOrder(ps, seq_length, seed, shuffle, eval_split) for ps in sets]
    rows = MixtureRows(orders, weights, seed)
    if eval_set is not None:
        eval_rows = EvalRows([SampleOrder(eval_set, seq_length, seed, False, 0.0)], separate=True)
    else:
        eval_rows = EvalRows(orders, separate=False) if eval_split > 0 else None
    name = " + ".join(f"{w:g} x {p}" for w, p in zip(weights, paths)) if len(paths) > 1 else f"prepared {paths[0]}"
    manifests = [ps.manifest for ps in sets] + ([eval_set.manifest] if eval_set is not None else [])
    return Data(tokenizer, rows, name, fingerprint(manifests, weights, seq_length, seed, shuffle, eval_split), eval_rows)


def attach_eval(data: Data, eval_data: str, seq_length: int, model_vocab: int) -> Data:
    """Validation on a prepared set beside tokenized-at-start-up or pre-batched training data (same tokenizer)."""
    eval_set = PreparedSet.open(Path(eval_data))
    if data.tokenizer is None:
        raise EngineError(f"--eval-data {eval_data}: the run has no tokenizer to check the set against")
    _tokenizer_for([eval_set], data.tokenizer.dir, model_vocab)
    data.eval_rows = EvalRows([SampleOrder(eval_set, seq_length, 0, False, 0.0)], separate=True)
    data.fingerprint += f"-eval{eval_set.manifest.id}"
    return data


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


__all__ = ["BatchLoader", "TokenBatches", "prepare_batches", "open_prepared", "attach_eval", "Data", "EvalRows",
           "MixtureRows", "Loader", "PackedRows", "Prefetcher", "TokenStream", "TextTokenizer", "prepare"]
