"""The shipped corpus and the default tokenizer: deterministic, cached, round-trips text."""

import hashlib

from gates.data import default


def test_corpus_is_shipped_and_nonempty():
    texts = default.corpus_texts()
    assert len(texts) > 100 and sum(map(len, texts)) > 500_000


def test_tokenizer_round_trip_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path))
    d1 = default.default_tokenizer_dir()
    stamp = (d1 / "tokenizer.json").stat().st_mtime_ns
    assert default.default_tokenizer_dir() == d1
    assert (d1 / "tokenizer.json").stat().st_mtime_ns == stamp, "second call retrained instead of loading the cache"
    tok = default.load_default_tokenizer()
    assert len(tok) == default.VOCAB_SIZE and tok.eos_token == default.EOS
    for text in ["def f(x):\n    return x ** 2  # ünïcödé ✓", default.corpus_texts()[5][:500], "   spaces\tand\ttabs\n\n"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())  # BPE actually merges


def test_tokenizer_training_is_deterministic(tmp_path):
    a = default.train_tokenizer(tmp_path / "a") / "tokenizer.json"
    b = default.train_tokenizer(tmp_path / "b") / "tokenizer.json"
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
