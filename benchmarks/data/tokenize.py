"""Tokenization throughput: `prepare-data` with 1 process and with every core, against `datasets.map` (batched,
the same `tokenizers` tokenizer, num_proc 1 and every core), on one synthetic text corpus, in one run.

Every configuration runs --repeats times, interleaved; the medians are compared. Both sides run the tokenizer
single-threaded per process (TOKENIZERS_PARALLELISM=false), so "per core" means one process; both append EOS
per document. prepare-data's time is end to end (hash the input, read it streamed,
tokenize, write and hash the shards); datasets' is load_dataset (JSON -> Arrow cache) and map, given apart.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.data import env
from benchmarks.data.corpus import text_corpus


def _prepare(corpus: Path, out: Path, workers: int, docs_per_shard: int) -> dict:
    from train_engine_0_5b.data import prepare_data

    load = env.load()
    t = time.perf_counter()
    res = prepare_data.run([str(corpus)], out, workers=workers, docs_per_shard=docs_per_shard)
    dt = time.perf_counter() - t
    n = res.manifest.n_tokens
    return {"method": "prepare-data", "processes": workers, "tokens": n, "seconds": round(dt, 3),
            "tokens_per_s": round(n / dt), "tokens_per_s_per_process": round(n / dt / workers), "load_avg_before": load}


def _datasets_map(corpus: Path, cache: Path, workers: int) -> dict:
    import datasets

    from train_engine_0_5b.data.tokenizer import TextTokenizer

    datasets.disable_progress_bars()
    tok = TextTokenizer()
    eos = tok.eos_id

    def encode(batch: dict) -> dict:
        ids = [[*x, eos] for x in tok.encode_batch(batch["text"])]
        return {"input_ids": ids, "n": [len(x) for x in ids]}

    load = env.load()
    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    mapped = ds.map(encode, batched=True, batch_size=1000, num_proc=workers if workers > 1 else None,
                    remove_columns=["text"], load_from_cache_file=False)
    t_map = time.perf_counter() - t
    n = int(sum(mapped["n"]))
    return {"method": "datasets.map", "processes": workers, "tokens": n, "seconds": round(t_map, 3),
            "load_dataset_seconds": round(t_load, 3), "tokens_per_s": round(n / t_map),
            "tokens_per_s_per_process": round(n / t_map / workers),
            "tokens_per_s_with_load": round(n / (t_map + t_load)), "load_avg_before": load}


def run(work: Path, megabytes: int, docs_per_shard: int, repeats: int) -> dict:
    """Every configuration `repeats` times, interleaved (a shared machine's load drifts: each configuration sees
    the same drift), and the median of each."""
    import shutil
    import statistics

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    corpus = text_corpus(work / "corpus.jsonl", megabytes << 20)
    cores = os.cpu_count() or 1
    procs = sorted({1, cores})
    rows = []
    for rep in range(repeats):
        for w in procs:
            rows.append({"repeat": rep, **_prepare(corpus, work / "prepared", w, docs_per_shard)})
            shutil.rmtree(work / "prepared")
            rows.append({"repeat": rep, **_datasets_map(corpus, work / "hf_cache", w)})
            shutil.rmtree(work / "hf_cache")
    same = len({r["tokens"] for r in rows}) == 1
    median = {f"{m} x{w}": round(statistics.median(r["tokens_per_s"] for r in rows if r["method"] == m and r["processes"] == w))
              for m in ("prepare-data", "datasets.map") for w in procs}
    return {"corpus": {"bytes": corpus.stat().st_size, "tokens": rows[0]["tokens"], "kind": "synthetic JSONL: words drawn "
                       "with the shipped corpus's word frequencies, 50-1500 words per document"},
            "tokenizer": "the engine's shipped byte-level BPE (4096 tokens), `tokenizers` 1 thread per process",
            "docs_per_shard": docs_per_shard, "repeats": repeats, "rows": rows, "same_token_count": same,
            "median_tokens_per_s": median,
            "prepare_vs_map_one_process": round(median["prepare-data x1"] / median["datasets.map x1"], 3),
            "prepare_vs_map_all_cores": round(median[f"prepare-data x{cores}"] / median[f"datasets.map x{cores}"], 3)}
