"""`pretrain --init-from DIR`: the MiniCPM family's reader of a Hugging Face checkpoint directory, shared with the
other engines (minicpm/init_from.py), re-exported for this engine's modules."""

from __future__ import annotations

from train_engine_0_5b.minicpm.init_from import load_init, tokenizer_dir

__all__ = ["load_init", "tokenizer_dir"]
