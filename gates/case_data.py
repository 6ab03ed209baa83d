"""Cases whose batches are real text: the shipped default corpus through the default tokenizer (M5).

Documents are tokenized in a seeded random order, joined with EOS, packed into rows of
`seq_length + 1` tokens, and cut into (steps, world_size, rows_per_rank) like `random_batches`.
Labels are the next token, none ignored. Token ids stay below the tokenizer's vocabulary (4096), so
they fit every preset.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from gates.case import CaseError, CaseSpec, new_case


def corpus_batches(spec: CaseSpec, seed: int) -> dict[str, torch.Tensor]:
    """(steps, world_size, rows_per_rank, seq) `input_ids` / `labels` from the default corpus."""
    from gates.data.default import EOS, corpus_texts, load_default_tokenizer

    tok = load_default_tokenizer()
    if len(tok) > spec.model.vocab_size:
        raise CaseError(f"the default tokenizer has {len(tok)} tokens; model vocab_size is {spec.model.vocab_size}")
    eos = tok.convert_tokens_to_ids(EOS)
    texts = corpus_texts()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + 2)).tolist()
    rows = spec.steps * spec.world_size * spec.rows_per_rank
    need = rows * (spec.seq_length + 1)
    stream: list[int] = []
    for i in order:
        stream += tok(texts[i], add_special_tokens=False)["input_ids"] + [eos]
        if len(stream) >= need:
            break
    if len(stream) < need:  # pragma: no cover - ~1 MB of text covers every gate case
        raise CaseError(f"the default corpus has {len(stream)} tokens; this case needs {need}")
    tokens = torch.tensor(stream[:need], dtype=torch.int64).view(spec.steps, spec.world_size, spec.rows_per_rank, -1)
    return {"input_ids": tokens[..., :-1].contiguous(), "labels": tokens[..., 1:].contiguous()}


def new_corpus_case(out: str | Path, spec: CaseSpec) -> Path:
    """A case directory with random weights (seeded by spec.seed) and corpus batches."""
    out = new_case(out, spec)
    save_file(corpus_batches(spec, spec.seed), str(Path(out) / "batches.safetensors"))
    return out
