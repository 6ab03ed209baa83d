"""Reading checkpoints of formats 1 and 2 (written whole by rank 0, before format 3's sharded state):

    step_XXXXXXXX/  model.safetensors      fp32 master weights, HF MiniCPM names
                    optimizer.safetensors  exp_avg.NAME, exp_avg_sq.NAME
                    rng.safetensors, tokenizer/, state.json (format 2: sha256 of every tensor and file)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import checksums
from .errors import EngineError

FORMATS = (1, 2)
MODEL_FILE, OPTIM_FILE = "model.safetensors", "optimizer.safetensors"


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise EngineError(f"checkpoint file {path} is damaged: {e}") from None


def load(path: Path, state: dict, rng_file: str) -> tuple[dict, dict, dict]:
    """(masters, moments, rng) of the checkpoint at `path`, every recorded checksum verified."""
    sums = state.get("checksums", {}).get("files") if state["format"] >= 2 else None
    if state["format"] >= 2 and not isinstance(sums, dict):
        raise EngineError(f"checkpoint file {path / 'state.json'} is damaged: it has no checksums")
    parts = {}
    for name in (MODEL_FILE, OPTIM_FILE, rng_file):
        parts[name] = load_tensors(path / name)
        if sums is not None:
            checksums.verify_tensors(path / name, parts[name], sums.get(name, {}))
    for name, digest in (sums or {}).items():
        if name not in parts:
            checksums.verify_file(path / name, digest)
    return parts[MODEL_FILE], parts[OPTIM_FILE], parts[rng_file]
