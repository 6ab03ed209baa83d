"""Prepared datasets: prepare-data (deterministic, any worker count, resumes), the shard reader, the global sample
order (a bijection; DP ranks disjoint and covering an epoch once), mixtures (proportions), and each bad input
(a truncated or corrupt shard, another tokenizer, another vocabulary size, an empty component, weights not
summing to 1) as an EngineError."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from .core_testlib import engine_import

EngineError = engine_import("core.errors").EngineError
Loader, open_prepared = engine_import("data", "Loader", "open_prepared")
prepare_data, shards = engine_import("data", "prepare_data", "shards")
MixtureRows, block_counts, check_weights = engine_import("data.mixture", "MixtureRows", "block_counts", "check_weights")
Permutation, SampleOrder = engine_import("data.sampler", "Permutation", "SampleOrder")
DEFAULT_DIR, TextTokenizer = engine_import("data.tokenizer", "DEFAULT_DIR", "TextTokenizer")

WORDS = ["alpha", "beta", "gamma", "delta", "tensor", "kernel", "norm", "rope", "swiglu", "adam", "shard", "memmap"]
VOCAB = 4096  # the shipped tokenizer's, the tiny model's


def write_corpus(path: Path, n_docs: int, rng: random.Random, empty_every: int = 0) -> Path:
    """JSONL of random documents (every `empty_every`-th one empty: prepare-data skips those)."""
    lines = []
    for i in range(n_docs):
        text = "" if empty_every and i % empty_every == 0 else " ".join(rng.choices(WORDS, k=rng.randint(3, 60)))
        lines.append(json.dumps({"text": text, "id": i}))
    path.write_text("\n".join(lines) + "\n")
    return path


def prepared(tmp_path: Path, name: str, n_docs: int = 120, docs_per_shard: int = 17, workers: int = 1,
             tokenizer: str | None = None, seed: int | None = None) -> Path:
    rng = random.Random(seed)
    corpus = write_corpus(tmp_path / f"{name}.jsonl", n_docs, rng)
    prepare_data.run([str(corpus)], tmp_path / name, tokenizer, workers=workers, docs_per_shard=docs_per_shard)
    return tmp_path / name


def stream(path: Path) -> np.ndarray:
    """A prepared set's whole token stream, read plainly (the reference for the memmap reader)."""
    m = shards.read_manifest(path)
    return np.concatenate([np.fromfile(path / f"{shards.shard_name(s.index)}.tokens", dtype=m.dtype) for s in m.shards])


def shipped_tokenizer_plus(tmp_path: Path, extra: int) -> Path:
    """The shipped tokenizer with `extra` added tokens: another fingerprint, vocabulary 4096 + extra."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEFAULT_DIR / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(extra)])
    out = tmp_path / f"tok_plus_{extra}"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text((DEFAULT_DIR / "tokenizer_config.json").read_text())
    return out


# --- prepare-data ---------------------------------------------------------------------------------------------


def test_prepare_matches_the_tokenizer_and_is_the_same_for_any_worker_count(tmp_path):
    rng = random.Random()
    corpus = write_corpus(tmp_path / "c.jsonl", 150, rng, empty_every=7)
    one = prepare_data.run([str(corpus)], tmp_path / "w1", workers=1, docs_per_shard=13).manifest
    two = prepare_data.run([str(corpus)], tmp_path / "w2", workers=2, docs_per_shard=13).manifest
    assert one == two and one.id == two.id and len(one.shards) > 3
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    texts = [t for t in texts if t.strip()]
    tok = TextTokenizer()
    want = np.concatenate([np.asarray([*ids, tok.eos_id]) for ids in tok.encode_batch(texts)])
    got = stream(tmp_path / "w1")
    assert got.dtype == np.uint16 and np.array_equal(got.astype(np.int64), want)
    assert one.n_docs == len(texts) and one.n_tokens == len(want) and one.vocab_size == VOCAB
    shards.verify(tmp_path / "w1")  # hashes and document boundaries (each document ends in EOS)


def test_formats_and_several_inputs_give_the_documents_in_input_order(tmp_path):
    import datasets

    rng = random.Random()
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(2, 30))) for _ in range(45)]
    datasets.Dataset.from_list([{"text": d} for d in docs[:15]]).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "b.txt").write_text("\n".join(docs[15:30]) + "\n")  # text files: one document per line
    datasets.Dataset.from_list([{"body": d} for d in docs[30:]]).save_to_disk(str(tmp_path / "c"))
    with pytest.raises(EngineError, match="no 'text' column"):
        prepare_data.run([str(tmp_path / "c")], tmp_path / "bad")
    inputs = [str(tmp_path / "a.parquet"), str(tmp_path / "b.txt")]
    m = prepare_data.run(inputs, tmp_path / "out", docs_per_shard=4).manifest
    tok = TextTokenizer()
    want = np.concatenate([np.asarray([*ids, tok.eos_id]) for ids in tok.encode_batch(docs[:30])])
    assert np.array_equal(stream(tmp_path / "out").astype(np.int64), want)
    assert [s.spec for s in m.sources] == inputs and all(len(s.files) == 1 and s.files[0][1] > 0 for s in m.sources)
    t = prepare_data.run([str(tmp_path / "c")], tmp_path / "tmpl", template="{body}").manifest
    want = np.concatenate([np.asarray([*ids, tok.eos_id]) for ids in tok.encode_batch(docs[30:])])
    assert np.array_equal(stream(tmp_path / "tmpl").astype(np.int64), want) and t.sources[0].text_template == "{body}"


def test_uint32_when_the_vocabulary_exceeds_uint16(tmp_path):
    tok = shipped_tokenizer_plus(tmp_path, 65_536 - VOCAB + 5)
    m = shards.read_manifest(prepared(tmp_path, "big", n_docs=20, tokenizer=str(tok)))
    assert m.dtype == "uint32" and m.vocab_size > 65_536


def test_an_interrupted_prepare_resumes_keeping_verified_shards(tmp_path):
    rng = random.Random()
    corpus = write_corpus(tmp_path / "c.jsonl", 100, rng)
    full = prepare_data.run([str(corpus)], tmp_path / "a", docs_per_shard=10).manifest
    out = tmp_path / "b"
    prepare_data.run([str(corpus)], out, docs_per_shard=10)
    # as if killed: no manifest yet, one shard never finished, one shard's tokens half written
    (out / shards.MANIFEST).unlink()
    (out / "shard_00004.json").unlink()
    tokens = out / "shard_00007.tokens"
    tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])
    with pytest.raises(EngineError, match="unfinished prepare-data run"):
        shards.read_manifest(out)
    res = prepare_data.run([str(corpus)], out, docs_per_shard=10)
    assert res.reused == len(full.shards) - 2  # every shard but the two damaged ones was kept
    assert res.manifest == full
    shards.verify(out)


def test_prepare_refuses_other_inputs_into_the_same_out(tmp_path):
    rng = random.Random()
    a, b = write_corpus(tmp_path / "a.jsonl", 30, rng), write_corpus(tmp_path / "b.jsonl", 30, rng)
    prepare_data.run([str(a)], tmp_path / "out", docs_per_shard=10)
    with pytest.raises(EngineError, match="other inputs"):
        prepare_data.run([str(b)], tmp_path / "out", docs_per_shard=10)


def test_prepare_of_a_corpus_without_text_is_an_error(tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("".join(json.dumps({"text": " " * random.randint(0, 3)}) + "\n" for _ in range(5)))
    with pytest.raises(EngineError, match="hold no text"):
        prepare_data.run([str(corpus)], tmp_path / "out")


def test_a_hub_name_offline_names_the_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineError, match="--input .some-org/some-corpus. is not a local path and the Hugging Face Hub is offline.*with --input"):
        prepare_data.run(["some-org/some-corpus"], tmp_path / "out")


# --- the sample order -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 1000, random.randint(5, 100_000)])
def test_permutation_is_a_bijection_and_depends_on_its_key(n):
    key = random.getrandbits(63)
    p = Permutation(n, key)(np.arange(n))
    assert np.array_equal(np.sort(p), np.arange(n))
    if n >= 1000:
        assert not np.array_equal(p, Permutation(n, key + 1)(np.arange(n)))
        assert not np.array_equal(p, np.arange(n))


def test_reader_rows_are_stream_windows_across_shard_boundaries(tmp_path):
    path = prepared(tmp_path, "d", docs_per_shard=5)
    whole = stream(path).astype(np.int64)
    seq = random.randint(20, 60)
    order = SampleOrder(shards.PreparedSet.open(path), seq, seed=1, shuffle=True, eval_split=0.0)
    ids = np.arange(order.n_samples)
    rows = order.read(ids)
    for i in ids:
        assert np.array_equal(rows[i], whole[i * seq : i * seq + seq + 1])
    offsets = shards.PreparedSet.open(path).offsets
    spanning = [i for i in ids if np.searchsorted(offsets, i * seq, "right") != np.searchsorted(offsets, i * seq + seq, "right")]
    assert spanning  # some windows do cross a shard boundary


def _sample_ids_loader(path: Path, seq: int, global_rows: int, rank: int, world: int, seed: int, eval_split: float):
    """A Loader whose rows carry their sample id in every column (to see which samples each rank gets)."""
    order = SampleOrder(shards.PreparedSet.open(path), seq, seed=seed, shuffle=True, eval_split=eval_split)
    order.read = lambda samples: np.repeat(samples[:, None], seq + 1, axis=1)
    return Loader(MixtureRows([order], [1.0], seed=0), global_rows, rank, world), order


def test_dp2_ranks_see_disjoint_samples_covering_each_epoch_exactly_once(tmp_path):
    path = prepared(tmp_path, "d", n_docs=200, docs_per_shard=23)
    seq, global_rows = 16, 6
    seed = random.randint(0, 999)  # every rank derives the order from the same seed, alone
    loaders = [_sample_ids_loader(path, seq, global_rows, r, 2, seed, eval_split=0.05) for r in range(2)]
    order = loaders[0][1]
    n_train = order.n_train
    steps = 2 * n_train // global_rows + 2
    seen = {r: np.concatenate([loaders[r][0].batch(s)[0][:, 0].numpy() for s in range(steps)]) for r in range(2)}
    # the global order is rank 0's rows then rank 1's rows of each step
    glob = np.concatenate([np.concatenate([seen[0][s * 3 : s * 3 + 3], seen[1][s * 3 : s * 3 + 3]]) for s in range(steps)])
    for epoch in range(2):
        ep = glob[epoch * n_train : (epoch + 1) * n_train]
        assert len(ep) == n_train and len(np.unique(ep)) == n_train  # each training sample exactly once
    held = set(order.eval_samples(np.arange(order.n_eval)).tolist())
    assert len(held) == order.n_eval and not held & set(glob.tolist())  # nothing held out is trained on
    assert set(glob[:n_train].tolist()) | held == set(range(order.n_samples))
    assert not np.array_equal(glob[:n_train], glob[n_train : 2 * n_train])  # epochs are reshuffled
    per_step0 = [set(loaders[r][0].batch(0)[0][:, 0].tolist()) for r in range(2)]
    assert not per_step0[0] & per_step0[1]


def test_the_order_depends_on_seed_and_index_only(tmp_path):
    path = prepared(tmp_path, "d")
    seed = random.randint(0, 10_000)
    a = SampleOrder(shards.PreparedSet.open(path), 16, seed, True, 0.1)
    b = SampleOrder(shards.PreparedSet.open(path), 16, seed, True, 0.1)
    q = np.array(random.sample(range(10 * a.n_train), 50))
    assert np.array_equal(a.train_samples(q), b.train_samples(q[::-1])[::-1])  # no state: any order of asking
    assert np.array_equal(a.eval_samples(np.arange(a.n_eval)), SampleOrder(shards.PreparedSet.open(path), 16, seed + 1, True, 0.1)
                          .eval_samples(np.arange(a.n_eval)))  # the held-out set does not move with the seed


# --- mixtures -------------------------------------------------------------------------------------------------


def test_mixture_proportions_and_each_component_in_its_own_order(tmp_path):
    paths = [prepared(tmp_path, f"m{i}", n_docs=40 + 30 * i, docs_per_shard=11) for i in range(3)]
    raw = np.random.default_rng().dirichlet([2, 2, 2])
    weights = [float(w) for w in raw[:-1]] + [1.0 - float(raw[:-1].sum())]
    data = open_prepared([str(p) for p in paths], weights, None, 0.0, None, 16, random.randint(0, 99), True, VOCAB)
    rows: MixtureRows = data.rows
    n = 40_000
    comp, pos = rows.assign(0, n)
    share = np.bincount(comp, minlength=3) / n
    assert np.allclose(share, weights, atol=2.0 / rows.block + 1e-9), (share, weights)
    for c in range(3):  # component c's positions are 0, 1, 2, ... in the order it is drawn
        assert np.array_equal(pos[comp == c], np.arange((comp == c).sum()))
    first, k = random.randint(0, n - 100), random.randint(1, 99)  # any window asks the same as the whole
    sub_c, sub_p = rows.assign(first, k)
    assert np.array_equal(sub_c, comp[first : first + k]) and np.array_equal(sub_p, pos[first : first + k])
    got = rows.rows(first, k)
    for j in range(k):
        order = rows.components[sub_c[j]]
        assert np.array_equal(got[j], order.read(order.train_samples(np.array([sub_p[j]])))[0])


def test_block_counts_sum_to_the_block_and_keep_small_weights():
    w = [0.001, 0.002, 0.997]
    counts = block_counts(w)
    assert counts.sum() >= 4000 and (counts >= 1).all()
    assert np.allclose(counts / counts.sum(), w, atol=1 / counts.sum())


# --- bad input ------------------------------------------------------------------------------------------------


def test_weights_not_summing_to_one_are_refused_with_the_normalized_ones(tmp_path):
    paths = [Path("a"), Path("b")]
    with pytest.raises(EngineError, match=r"sum to 1\.5, not 1; they are not normalized.*0\.666667,0\.333333"):
        check_weights(paths, [1.0, 0.5])
    for bad in ([0.5], [1.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(EngineError, match="--data-weights"):
            check_weights(paths, bad)
    assert check_weights(paths, [0.25, 0.75]) == [0.25, 0.75]


def test_a_truncated_shard_fails_at_open(tmp_path):
    path = prepared(tmp_path, "d")
    victim = path / "shard_00002.tokens"
    victim.write_bytes(victim.read_bytes()[: -random.randint(1, 50)])
    with pytest.raises(EngineError, match="shard_00002.tokens is truncated or corrupt"):
        open_prepared([str(path)], None, None, 0.0, None, 16, 0, True, VOCAB)


def test_a_missing_shard_fails_at_open(tmp_path):
    path = prepared(tmp_path, "d")
    (path / "shard_00001.tokens").unlink()
    with pytest.raises(EngineError, match="shard_00001.tokens is missing"):
        open_prepared([str(path)], None, None, 0.0, None, 16, 0, True, VOCAB)


def test_a_corrupt_shard_fails_when_read_and_when_verified(tmp_path):
    path = prepared(tmp_path, "d", docs_per_shard=40)
    victim = path / "shard_00001.tokens"
    data = np.fromfile(victim, dtype=np.uint16)
    at = random.randint(0, len(data) - 8)
    data[at : at + 8] = np.random.default_rng().integers(VOCAB, 65_536, 8)  # ids past the vocabulary
    data.tofile(victim)
    with pytest.raises(EngineError, match="does not match its hash"):
        shards.verify(path)
    data_ = open_prepared([str(path)], None, None, 0.0, None, 16, 0, True, VOCAB)
    order = data_.rows.components[0]
    with pytest.raises(EngineError, match="shard_00001.tokens holds token id .* corrupt"):
        order.read(np.arange(order.n_samples))


def test_another_tokenizer_than_the_shards_is_refused(tmp_path):
    path = prepared(tmp_path, "d")
    other = shipped_tokenizer_plus(tmp_path, 0)  # same vocabulary, other file: another fingerprint
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "model_max_length": 7}))
    assert TextTokenizer(other).fingerprint != TextTokenizer().fingerprint
    with pytest.raises(EngineError, match="is not the one prepared dataset .* was tokenized with"):
        open_prepared([str(path)], None, None, 0.0, str(other), 16, 0, True, VOCAB)
    open_prepared([str(path)], None, None, 0.0, str(DEFAULT_DIR), 16, 0, True, VOCAB)  # the same one is fine


def test_a_mixture_of_two_tokenizers_is_refused(tmp_path):
    tok = shipped_tokenizer_plus(tmp_path, 3)
    a, b = prepared(tmp_path, "a"), prepared(tmp_path, "b", tokenizer=str(tok))
    with pytest.raises(EngineError, match="different tokenizers"):
        open_prepared([str(a), str(b)], [0.5, 0.5], None, 0.0, None, 16, 0, True, VOCAB + 3)


def test_a_set_from_another_vocabulary_size_is_refused(tmp_path):
    tok = shipped_tokenizer_plus(tmp_path, random.randint(1, 500))
    path = prepared(tmp_path, "d", tokenizer=str(tok))
    with pytest.raises(EngineError, match=f"vocabulary of {TextTokenizer(tok).vocab_size} tokens; the model's vocabulary is {VOCAB}"):
        open_prepared([str(path)], None, None, 0.0, None, 16, 0, True, VOCAB)


def test_an_empty_mixture_component_is_refused(tmp_path):
    full = prepared(tmp_path, "full")
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": random.choice(WORDS)}) + "\n")  # a couple of tokens: no sample of 64
    prepare_data.run([str(tiny)], tmp_path / "tiny")
    with pytest.raises(EngineError, match="tiny is empty for this run"):
        open_prepared([str(full), str(tmp_path / "tiny")], [0.5, 0.5], None, 0.0, None, 64, 0, True, VOCAB)


def test_a_directory_without_manifest_is_refused(tmp_path):
    with pytest.raises(EngineError, match="no such directory"):
        open_prepared([str(tmp_path / "nope")], None, None, 0.0, None, 16, 0, True, VOCAB)
    (tmp_path / "plain").mkdir()
    with pytest.raises(EngineError, match="not a prepared dataset"):
        open_prepared([str(tmp_path / "plain")], None, None, 0.0, None, 16, 0, True, VOCAB)
