"""The offline default corpus and tokenizer.

- `corpus_texts()`: the shipped corpus (`default_corpus.jsonl.gz`, see make_corpus.py), a list of str.
- `default_tokenizer_dir()`: a byte-level BPE (vocab `VOCAB_SIZE`, EOS `<|endoftext|>`) trained on it
  with `tokenizers`, saved as a Hugging Face tokenizer directory under the cache
  (`FORGE_CACHE_DIR`, default `~/.cache/forge`), keyed by a hash of the corpus and the trainer
  settings, so later runs load instead of retraining. Training is single-threaded: deterministic.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

CORPUS_FILE = Path(__file__).with_name("default_corpus.jsonl.gz")
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS]


def cache_root() -> Path:
    return Path(os.environ.get("FORGE_CACHE_DIR", Path.home() / ".cache" / "forge"))


def corpus_texts() -> list[str]:
    with gzip.open(CORPUS_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _key() -> str:
    h = hashlib.sha256(CORPUS_FILE.read_bytes())
    h.update(f"bytelevel-bpe v1 vocab={VOCAB_SIZE} special={SPECIAL_TOKENS}".encode())
    return h.hexdigest()[:16]


def train_tokenizer(out_dir: Path) -> Path:
    """Train the default tokenizer into `out_dir` (a HF tokenizer directory)."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # tokenizers' trainer: one thread, one merge order
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)
    fast.save_pretrained(str(out_dir))
    return out_dir


def default_tokenizer_dir() -> Path:
    """The cached default tokenizer directory; trained (a few seconds) on first use. Safe under
    concurrent first use: each trainer writes to its own temporary directory, then renames."""
    final = cache_root() / f"tokenizer-{_key()}"
    if (final / "tokenizer.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=final.parent))
    train_tokenizer(tmp)
    try:
        os.rename(tmp, final)
    except OSError:  # another process won the race; its result is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_default_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
