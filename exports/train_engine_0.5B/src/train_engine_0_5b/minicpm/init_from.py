"""`pretrain --init-from DIR`: start from a Hugging Face MiniCPM checkpoint directory (continued pretraining).

DIR is laid out as OpenBMB publishes MiniCPM4 (and as `export-hf --layout minicpm` writes): `config.json`
(MiniCPM keys; from_hf_config refuses any that would change the math in a way this engine does not
implement) and the weights under HF MiniCPM names, as `model.safetensors`, a sharded
`model.safetensors.index.json`, `pytorch_model.bin` or a sharded `pytorch_model.bin.index.json` (read with
weights_only=True). Every parameter must be there with its shape (a tied checkpoint may also carry
`lm_head.weight`, which must then equal the embedding). Its tokenizer (`tokenizer.json`, or a sentencepiece
`tokenizer.model` read through transformers) is the run's unless --tokenizer-path names another.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..core.errors import EngineError
from .config import MiniCPMConfig, hf_param_shapes
from .hf_config import from_hf_config


def _shards(d: Path, index: Path) -> list[Path]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise EngineError(f"--init-from {d}: {index.name} is not a weight index ({type(e).__name__}: {e})") from None
    missing = [s for s in shards if not (d / s).is_file()]
    if missing:
        raise EngineError(f"--init-from {d}: shard {missing[0]} named by {index.name} is missing")
    return [d / s for s in shards]


def _weight_files(d: Path) -> list[Path]:
    """The first layout present, in transformers' order of preference."""
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    if (d / "model.safetensors.index.json").is_file():
        return _shards(d, d / "model.safetensors.index.json")
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]
    if (d / "pytorch_model.bin.index.json").is_file():
        return _shards(d, d / "pytorch_model.bin.index.json")
    raise EngineError(f"--init-from {d}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
                      "pytorch_model.bin.index.json")


def tokenizer_dir(d: Path) -> Path | None:
    """DIR itself when it carries a tokenizer (tokenizer.json or a sentencepiece tokenizer.model), else None."""
    return d if any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) else None


def _read(f: Path) -> dict[str, Tensor]:
    try:
        if f.suffix == ".bin":
            return torch.load(f, map_location="cpu", weights_only=True)
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EngineError(f"--init-from: cannot read {f}: {e}") from None


def load_init(d: Path) -> tuple[MiniCPMConfig, dict[str, Tensor]]:
    """(model config, float32 weights by HF name) of a HF MiniCPM directory; EngineError names what is wrong."""
    if not d.is_dir():
        raise EngineError(f"--init-from {d}: not a directory (expected a Hugging Face MiniCPM checkpoint directory)")
    cfg, _ignored = from_hf_config(d / "config.json")
    weights: dict[str, Tensor] = {}
    for f in _weight_files(d):
        weights |= _read(f)
    for name in [k for k in weights if k.endswith("rotary_emb.inv_freq")]:  # buffers older saves kept; from config.json here
        del weights[name]
    want = hf_param_shapes(cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" in weights:
        head = weights.pop("lm_head.weight")
        if not torch.equal(head, weights.get("model.embed_tokens.weight", head)):
            raise EngineError(f"--init-from {d}: config.json ties the embeddings but lm_head.weight differs from "
                              "model.embed_tokens.weight")
    missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    if missing or extra:
        raise EngineError(f"--init-from {d}: weights do not match config.json's model (missing {missing[:3]}, "
                          f"unexpected {extra[:3]})")
    for name, shape in want.items():
        if tuple(weights[name].shape) != shape:
            raise EngineError(f"--init-from {d}: {name} has shape {tuple(weights[name].shape)}, config.json implies {shape}")
        if not weights[name].is_floating_point() or not bool(torch.isfinite(weights[name]).all()):
            raise EngineError(f"--init-from {d}: {name} is not finite floating point")
    return cfg, {k: weights[k].to(torch.float32) for k in want}
