"""Cases whose batches are real text: the shipped default corpus through the default tokenizer (M5).

Documents are tokenized in a seeded random order, joined with EOS, packed into rows of
`seq_length + 1` tokens, and cut into (steps, world_size, rows_per_rank) like `random_batches`; a case
longer than the corpus continues with the next epochs.
Labels are the next token, none ignored. Token ids stay below the tokenizer's vocabulary (4096), so
they fit every preset.
"""

from __future__ import annotations

import functools

from pathlib import Path

import torch

from gates.case import CaseError, CaseSpec, new_case


def corpus_batches(spec: CaseSpec, seed: int) -> dict[str, torch.Tensor]:
    """(steps, world_size, rows_per_rank, seq) `input_ids` / `labels` from the default corpus; when a case
    needs more tokens than the corpus holds (the speed runs), further epochs follow in new seeded orders."""
    tok_docs, _ = _tokenized_corpus(spec.model.vocab_size)
    rows = spec.steps * spec.world_size * spec.rows_per_rank
    need = rows * (spec.seq_length + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    pieces: list[torch.Tensor] = []
    have = 0
    while have < need:
        for i in torch.randperm(len(tok_docs), generator=gen).tolist():
            pieces.append(tok_docs[i])
            have += len(tok_docs[i])
            if have >= need:
                break
    tokens = torch.cat(pieces)[:need].view(spec.steps, spec.world_size, spec.rows_per_rank, -1)
    return {"input_ids": tokens[..., :-1].contiguous(), "labels": tokens[..., 1:].contiguous()}


@functools.lru_cache(maxsize=1)
def _corpus_ids() -> tuple[list[torch.Tensor], int]:
    """Every document of the default corpus tokenized once, each followed by EOS."""
    from gates.data.default import EOS, corpus_texts, load_default_tokenizer

    tok = load_default_tokenizer()
    eos = tok.convert_tokens_to_ids(EOS)
    docs = [torch.tensor(ids + [eos], dtype=torch.int64)
            for ids in tok(corpus_texts(), add_special_tokens=False)["input_ids"]]
    return docs, len(tok)


def _tokenized_corpus(vocab_size: int) -> tuple[list[torch.Tensor], int]:
    docs, n_tokens = _corpus_ids()
    if n_tokens > vocab_size:
        raise CaseError(f"the default tokenizer has {n_tokens} tokens; model vocab_size is {vocab_size}")
    return docs, n_tokens


def new_corpus_case(out: str | Path, spec: CaseSpec) -> Path:
    """A case directory with random weights (seeded by spec.seed) and corpus batches."""
    return new_case(out, spec, batches=corpus_batches(spec, spec.seed))
