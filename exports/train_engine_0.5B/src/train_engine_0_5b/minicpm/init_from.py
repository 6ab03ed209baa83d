"""`pretrain --init-from DIR`: start from a Hugging Face MiniCPM checkpoint directory (continued pretraining).

DIR is laid out as OpenBMB publishes MiniCPM4 (and as `export-hf --layout minicpm` writes): `config.json`
(MiniCPM keys; from_hf_config refuses any that would change the math in a way this engine does not
implement) and the weights under HF MiniCPM names, as `model.safetensors`, a sharded
`model.safetensors.index.json`, `pytorch_model.bin` or a sharded `pytorch_model.bin.index.json` (read with
weights_only=True). Every parameter must be there with its shape (a tied checkpoint may also carry
`lm_head.weight`, which must then equal the embedding). Its tokenizer (`tokenizer.json`, or a sentencepiece
`tokenizer.model` read through transformers) is the run's unless --tokenizer-path names another.

`open_init(DIR)` reads lazily (issue 29: at 8B size every rank reading every weight in float32 is ~32 GB per
rank): `HFWeights` (a core/weights.py `WeightSource`) checks the config, the names, the shapes and the dtypes
from the safetensors headers alone, and `read(name, region)` reads one rectangle of one tensor (a rank's TP
shard; `core/weights.local_masters` asks for exactly what each rank keeps), converts it to float32 and checks it
is finite. The tied-head check compares the rectangle read of `lm_head.weight` with the same rectangle of the
embedding, each time the embedding is read: on a whole read (no TP; the tied configs TP refuses) that is the
whole tensor, as before. `.bin` files cannot be read in parts: they are loaded whole, on every rank, when the
directory is opened (as before this reader; convert a large `.bin` checkpoint to safetensors). `load_init`
reads everything at once (the whole dict of float32 weights, as it always returned).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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


def _read_bin(f: Path) -> dict[str, Tensor]:
    """A whole .bin file (pickled tensors cannot be read in parts)."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        raise EngineError(f"--init-from: cannot read {f}: {e}") from None


class HFWeights:
    """The weights of a HF MiniCPM directory, read a tensor (or a rectangle of one) at a time; see the module
    docstring. `bytes_read`: bytes of checkpoint data this reader has materialized so far (in the files' own
    dtypes; a .bin directory's whole size at open)."""

    def __init__(self, d: Path, cfg: MiniCPMConfig):
        self.directory, self.cfg = d, cfg
        self.bytes_read = 0
        self._file: dict[str, Path] = {}  # safetensors: name -> the file holding it
        self._whole: dict[str, Tensor] = {}  # .bin: every tensor, loaded at open
        shapes: dict[str, tuple[int, ...]] = {}
        floating: dict[str, bool] = {}
        for f in _weight_files(d):
            if f.suffix == ".bin":
                tensors = _read_bin(f)
                self._whole |= tensors
                self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
                for k, t in tensors.items():
                    shapes[k], floating[k] = tuple(t.shape), t.is_floating_point()
                    self._file.pop(k, None)
                continue
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        sl = h.get_slice(k)
                        shapes[k], floating[k] = tuple(sl.get_shape()), _floating(sl.get_dtype())
                        self._file[k] = f
                        self._whole.pop(k, None)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise EngineError(f"--init-from: cannot read {f}: {e}") from None
        for name in [k for k in shapes if k.endswith("rotary_emb.inv_freq")]:  # buffers older saves kept; from config.json here
            del shapes[name]
        want = hf_param_shapes(cfg)
        embed, self._tied_head = "model.embed_tokens.weight", False
        if cfg.tie_word_embeddings and "lm_head.weight" in shapes:
            head = shapes.pop("lm_head.weight")
            if embed in shapes and head != shapes[embed]:
                raise EngineError(f"--init-from {d}: config.json ties the embeddings but lm_head.weight differs from "
                                  "model.embed_tokens.weight")
            self._tied_head = embed in shapes  # compared with the embedding where it is read
        missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
        if missing or extra:
            raise EngineError(f"--init-from {d}: weights do not match config.json's model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
        for name, shape in want.items():
            if shapes[name] != shape:
                raise EngineError(f"--init-from {d}: {name} has shape {shapes[name]}, config.json implies {shape}")
            if not floating[name]:
                raise EngineError(f"--init-from {d}: {name} is not finite floating point")
        self._shapes = want

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, region: tuple[slice, ...] | None = None) -> Tensor:
        values = self._raw(name, region)
        if name == "model.embed_tokens.weight" and self._tied_head:
            if not torch.equal(self._raw("lm_head.weight", region), values):
                raise EngineError(f"--init-from {self.directory}: config.json ties the embeddings but lm_head.weight "
                                  "differs from model.embed_tokens.weight")
        if not bool(torch.isfinite(values).all()):
            raise EngineError(f"--init-from {self.directory}: {name} is not finite floating point")
        return values.to(torch.float32)

    def read_all(self) -> dict[str, Tensor]:
        """Every weight, whole, in float32 (one process holding the whole model)."""
        return {name: self.read(name) for name in self._shapes}

    def _raw(self, name: str, region: tuple[slice, ...] | None) -> Tensor:
        """The region of `name` in the file's dtype."""
        if name not in self._file:  # a .bin's tensor, already in memory
            t = self._whole[name]
            return t if region is None else t[region]
        f = self._file[name]
        try:
            with safe_open(str(f), framework="pt") as h:
                t = h.get_tensor(name) if region is None else h.get_slice(name)[region]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise EngineError(f"--init-from: cannot read {name} from {f}: {e}") from None
        self.bytes_read += t.numel() * t.element_size()
        return t


def _floating(dtype: str) -> bool:
    """Whether a safetensors dtype name (F32, BF16, F8_E4M3, I64, BOOL, ...) is a floating point one."""
    return dtype.startswith("F") or dtype.startswith("BF")


def open_init(d: Path) -> tuple[MiniCPMConfig, HFWeights]:
    """(model config, lazy reader of the weights) of a HF MiniCPM directory; EngineError names what is wrong
    with the directory, its config, its names, shapes or dtypes (values: when read)."""
    if not d.is_dir():
        raise EngineError(f"--init-from {d}: not a directory (expected a Hugging Face MiniCPM checkpoint directory)")
    cfg, _ignored = from_hf_config(d / "config.json")
    return cfg, HFWeights(d, cfg)


def load_init(d: Path) -> tuple[MiniCPMConfig, dict[str, Tensor]]:
    """(model config, float32 weights by HF name) of a HF MiniCPM directory, every weight read whole; EngineError
    names what is wrong."""
    cfg, weights = open_init(d)
    return cfg, weights.read_all()
