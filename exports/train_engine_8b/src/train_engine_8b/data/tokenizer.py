"""Tokenizers: a Hugging Face tokenizer directory, through `tokenizers` when it has a tokenizer.json
(fast to import and load), else through `transformers` (e.g. a sentencepiece-only directory).

Documents are encoded without special tokens and end with the tokenizer's EOS (the pretraining
document separator); the shipped default tokenizer (`DEFAULT_DIR`) is a byte-level BPE of 4096
tokens trained on the shipped corpus.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..core.errors import EngineError

DEFAULT_DIR = Path(__file__).with_name("tokenizer")
# Files a tokenizer directory may hold; the ones present travel with checkpoints and HF exports.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """`encode_batch(texts) -> ids` (no special tokens), `eos_id`, `vocab_size`, `save(dir)`, `fingerprint`."""

    def __init__(self, path: str | Path | None = None):
        self.dir = Path(path) if path is not None else DEFAULT_DIR
        if not self.dir.is_dir():
            raise EngineError(f"tokenizer path {self.dir} is not a directory (expected a Hugging Face tokenizer "
                              "directory with tokenizer.json; omit --tokenizer-path for the shipped default)")
        config = self._read_config()
        self._fast = None
        self._hf = None
        try:
            if (self.dir / "tokenizer.json").is_file():
                from tokenizers import Tokenizer

                self._fast = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
            else:
                from transformers import AutoTokenizer

                self._hf = AutoTokenizer.from_pretrained(str(self.dir), local_files_only=True)
        except Exception as e:  # tokenizers / transformers raise many types for a bad file
            raise EngineError(f"cannot load the tokenizer in {self.dir}: {type(e).__name__}: {e}") from None
        eos = _token_text(config.get("eos_token"))
        if eos is None and self._hf is not None:
            eos = self._hf.eos_token
        eos_id = self.token_id(eos) if eos else None
        if eos_id is None:
            raise EngineError(f"the tokenizer in {self.dir} defines no EOS token (eos_token in tokenizer_config.json); "
                              "documents need one to be packed")
        self.eos_id = eos_id

    def _read_config(self) -> dict:
        path = self.dir / "tokenizer_config.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineError(f"cannot load the tokenizer in {self.dir}: tokenizer_config.json is not JSON ({e})") from None

    def token_id(self, token: str) -> int | None:
        if self._fast is not None:
            return self._fast.token_to_id(token)
        tid = self._hf.convert_tokens_to_ids(token)
        return None if tid == self._hf.unk_token_id and token != self._hf.unk_token else tid

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce is below this."""
        return self._fast.get_vocab_size(with_added_tokens=True) if self._fast is not None else len(self._hf)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=False)]
        return self._hf(texts, add_special_tokens=False)["input_ids"]

    def files(self) -> list[Path]:
        return [self.dir / f for f in TOKENIZER_FILES if (self.dir / f).is_file()]

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for f in self.files():
            shutil.copyfile(f, out / f.name)

    @property
    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for f in self.files():
            h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()
