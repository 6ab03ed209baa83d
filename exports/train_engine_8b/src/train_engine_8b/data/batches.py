"""Pre-batched token ids (`pretrain --token-batches FILE`): train on exactly these batches, e.g. to
reproduce a run, to ablate on fixed data, or as the gates hand data to `pretrain`.

The file is safetensors with `input_ids` and `labels`, int64, shape (steps, global_rows, seq); labels of
-100 are ignored. Step t (0-based) is `[t]`; rank r of W takes rows [r*G/W, (r+1)*G/W). The cursor is the
step, as for packed rows, so a resume continues at the batch after its checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..core.errors import EngineError

IGNORE_INDEX = -100


class TokenBatches:
    """All steps' batches of one file, checked against the run's shape before any training state exists."""

    def __init__(self, path: Path, num_steps: int, global_rows: int, seq_length: int, vocab_size: int):
        if not path.is_file():
            raise EngineError(f"--token-batches {path}: no such file")
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise EngineError(f"--token-batches {path}: not a readable safetensors file ({e})") from None
        for key in ("input_ids", "labels"):
            if key not in data:
                raise EngineError(f"--token-batches {path}: no `{key}` tensor (it holds {sorted(data)})")
        ids, labels = data["input_ids"], data["labels"]
        if ids.dtype != torch.int64 or labels.dtype != torch.int64 or ids.ndim != 3 or ids.shape != labels.shape:
            raise EngineError(f"--token-batches {path}: input_ids and labels must be int64 of one shape (steps, rows, seq); "
                              f"got {tuple(ids.shape)} {ids.dtype} and {tuple(labels.shape)} {labels.dtype}")
        steps, rows, seq = ids.shape
        if rows != global_rows or seq != seq_length:
            raise EngineError(f"--token-batches {path} holds batches of {rows} x {seq}; the run has --global-batch-size "
                              f"{global_rows} and --seq-length {seq_length}")
        if steps < num_steps:
            raise EngineError(f"--token-batches {path} holds {steps} steps; --num-steps is {num_steps}")
        bad = (ids < 0) | (ids >= vocab_size) | (((labels < 0) | (labels >= vocab_size)) & (labels != IGNORE_INDEX))
        if bool(bad.any()):
            raise EngineError(f"--token-batches {path}: token ids outside the model's vocabulary [0, {vocab_size})")
        self.path, self.input_ids, self.labels = path, ids, labels
        self.fingerprint = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()

    @property
    def tokens_per_step(self) -> int:
        return self.input_ids.shape[1] * self.input_ids.shape[2]


class BatchLoader:
    """This rank's rows of each step of a TokenBatches (the Loader interface: `batch`, `cursor`)."""

    def __init__(self, batches: TokenBatches, rank: int, world: int):
        rows = batches.input_ids.shape[1]
        if rows % world:
            raise EngineError(f"global batch of {rows} rows does not split over {world} ranks")
        self.batches, self.local = batches, rows // world
        self.rows = slice(rank * self.local, (rank + 1) * self.local)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        b = self.batches
        return b.input_ids[step, self.rows].clone(), b.labels[step, self.rows].clone()

    def cursor(self, step: int) -> dict:
        return {"next_step": step, "token_batches": str(self.batches.path), "fingerprint": self.batches.fingerprint}
