"""`export-hf`: a checkpoint (any world size, ZeRO-1 or tensor-parallel layout: read whole in one process) -> one
unsharded Hugging Face directory, plus the tokenizer files the checkpoint carries (the
run's; the shipped one for a probe's). Two layouts:
- `llama`: MiniCPM's scales folded into the weights and RoPE as transformers' own rope type (minicpm/hf_fold.py), so
  `transformers.AutoModelForCausalLM.from_pretrained` loads it without remote code;
- `minicpm`: the native layout OpenBMB publishes (MiniCPM config.json, HF MiniCPM names, unfolded), which
  `pretrain --init-from` reads back to the checkpoint's weights."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..core import checkpoint as ckpt
from ..core.config import DTYPES
from ..core.errors import EngineError
from ..data.tokenizer import TextTokenizer
from .config import MiniCPMConfig
from .hf_config import to_hf_minicpm_config
from .hf_fold import fold_to_llama, llama_config_dict

LAYOUTS = ("llama", "minicpm")


def export(checkpoint: Path, out: Path, dtype: str = "float32", force: bool = False, layout: str = "llama") -> Path:
    """Write the HF directory `out` atomically; returns it. A non-empty `out` is refused unless `force`
    (then it is replaced)."""
    if dtype not in ("float32", "bfloat16"):
        raise EngineError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    if layout not in LAYOUTS:
        raise EngineError(f"--layout {layout!r}: choose {' or '.join(LAYOUTS)}")
    if not force and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EngineError(f"--out {out} is not empty; choose another directory or pass --force to replace it")
    loaded = ckpt.load(checkpoint)
    if "model" not in loaded.state.get("config", {}):
        raise EngineError(f"checkpoint {loaded.path} records no model config; it was not written by this engine")
    cfg = MiniCPMConfig(**loaded.state["config"]["model"])
    has_tokenizer = (loaded.path / ckpt.TOKENIZER_DIR).is_dir()
    tokenizer = TextTokenizer(loaded.path / ckpt.TOKENIZER_DIR) if has_tokenizer else None
    eos = tokenizer.eos_id if tokenizer is not None else None
    if layout == "llama":
        weights, config = fold_to_llama(cfg, loaded.master), llama_config_dict(cfg, bos_token_id=eos, eos_token_id=eos)
    else:
        weights, config = loaded.master, to_hf_minicpm_config(cfg) | {"bos_token_id": eos, "eos_token_id": eos}
    weights = {k: v.to(DTYPES[dtype]).contiguous() for k, v in weights.items()}
    config["torch_dtype"] = dtype

    out = out.resolve()
    with ckpt.atomic_directory(out) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        else:
            print(f"note: checkpoint {loaded.path} carries no tokenizer; the export has none either")
    return out
