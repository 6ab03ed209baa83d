"""Data: every local format through `datasets`, the text template, packing into rows, per-rank
sharding and the resume cursor."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from .core_testlib import engine_import

EngineError = engine_import("core.errors").EngineError
Loader, PackedRows, TokenStream, prepare = engine_import("data", "Loader", "PackedRows", "TokenStream", "prepare")
Source, _looks_local, open_source, renderer = engine_import("data.sources", "Source", "_looks_local", "open_source", "renderer")
TextTokenizer = engine_import("data.tokenizer").TextTokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "tensor", "kernel", "norm", "rope", "swiglu", "adam"]


def qa_records(n: int) -> list[dict]:
    rng = random.Random()
    return [{"question": " ".join(rng.choices(WORDS, k=rng.randint(1, 8))) + "?",
             "answer": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))} for _ in range(n)]


def write(fmt: str, rows: list[dict], tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json-dir":
        path = tmp_path / "dir"
        path.mkdir()
        half = len(rows) // 2
        for i, part in enumerate((rows[:half], rows[half:])):
            (path / f"part{i}.json").write_text("".join(json.dumps(r) + "\n" for r in part))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    elif fmt == "save_to_disk":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    elif fmt == "arrow-file":
        ds.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json-dir", "parquet", "save_to_disk", "arrow-file"])
def test_local_formats_with_template(fmt, tmp_path):
    rows = qa_records(7)
    source = open_source(str(write(fmt, rows, tmp_path)))
    render = renderer(source, "Question: {question}\\nAnswer: {answer}")  # as a shell passes it
    texts = [t for batch in source.batches() for t in render(batch)]
    assert texts == [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


def test_text_files(tmp_path):
    lines = [" ".join(random.choices(WORDS, k=5)) for _ in range(6)]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    source = open_source(str(tmp_path / "a.txt"))
    assert [t for b in source.batches() for t in renderer(source, None)(b)] == lines


def test_hub_names_and_local_paths_are_told_apart():
    assert not _looks_local("HuggingFaceFW/fineweb-edu") and not _looks_local("wikitext")
    assert _looks_local("./data") and _looks_local("/data/x") and _looks_local("corpus.parquet")
    with pytest.raises(EngineError, match="does not exist"):
        open_source("./no/such/dir")


def _stream(docs: list[str]) -> tuple[TokenStream, TextTokenizer]:
    tok = TextTokenizer()
    source = Source("test", ["text"], len(docs), lambda: iter([{"text": docs}]))
    return TokenStream.build(source, renderer(source, None), tok), tok


def test_packing_rows_share_one_token_and_follow_the_epoch_order():
    docs = [" ".join(random.choices(WORDS, k=random.randint(3, 40))) for _ in range(9)]
    stream, tok = _stream(docs)
    seq = 16
    rows = PackedRows(stream, seq, seed=random.randint(0, 1000), shuffle=True)
    n = 3 * (stream.tokens.size // seq) + 2  # spans three epochs
    r = rows.rows(0, n)
    assert r.shape == (n, seq + 1)
    assert (r[1:, 0] == r[:-1, -1]).all()  # row j+1 starts at row j's last token
    flat = np.concatenate([r[0], *[x[1:] for x in r[1:]]])
    epoch_streams = []
    for e in range(4):
        order, _ = rows._epoch(e)
        ids = [tok.encode_batch([docs[i]])[0] + [tok.eos_id] for i in order]
        epoch_streams.append(np.array([t for doc in ids for t in doc]))
    expected = np.concatenate(epoch_streams)[: flat.size]
    assert (flat == expected).all()
    assert len({tuple(rows._epoch(e)[0]) for e in range(4)}) > 1  # reshuffled each epoch (9! orders)
    # Deterministic: a fresh instance (e.g. after a restart) gives the same rows from any starting point.
    again = PackedRows(stream, seq, seed=rows.seed, shuffle=True)
    assert (again.rows(n - 5, 5) == r[n - 5:]).all()


def test_unshuffled_rows_follow_dataset_order():
    docs = ["one two three", "four five", "six"]
    stream, tok = _stream(docs)
    r = PackedRows(stream, 4, seed=0, shuffle=False).rows(0, 1)[0]
    expected = [t for d in docs for t in tok.encode_batch([d])[0] + [tok.eos_id]]
    assert r.tolist() == expected[:5]


def test_ranks_shard_the_global_batch_and_the_cursor_is_the_step():
    data = prepare(None, None, "train", None, None, seq_length=8, seed=random.randint(0, 99), shuffle=True, model_vocab=4096)
    world, global_rows = 2, 6
    step = random.randint(0, 10_000)  # far into the stream: many epochs of the shipped corpus
    whole = Loader(data.rows, global_rows, 0, 1).batch(step)
    parts = [Loader(data.rows, global_rows, r, world).batch(step) for r in range(world)]
    for i in range(2):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
    ids, labels = whole
    assert torch.equal(ids[:, 1:], labels[:, :-1])  # labels are the next token
    assert ids.dtype == torch.int64 and int(ids.max()) < 4096
    fresh = Loader(data.rows, global_rows, 0, 1)  # a resumed process asks for the step directly
    assert torch.equal(fresh.batch(step)[0], whole[0])
    assert fresh.cursor(step)["rows_consumed"] == step * global_rows
