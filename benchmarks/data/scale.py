"""Start-up time, peak RSS and loader throughput on prepared corpora of growing size (synthetic token shards
written to a scratch folder, deleted afterwards).

Start-up (and, with --on-the-fly-mb, the tokenize-at-start-up path on a text corpus for contrast): a fresh
process runs `pretrain --model tiny --prepared-data SET --num-steps 1` (the data part is the same for the 0.5B;
tiny keeps the model's share of time and RAM small); it reports the time to open the set
(manifest + a stat per shard), the time of the whole command, its peak RSS, and the parent the wall time from
spawn to exit (interpreter and imports included). Loader: a fresh one-thread process calls the per-rank
loader's `batch(step)` (the prefetch thread's work: global sample order, memmap reads, int64 rows) for
micro batch 8 x seq 4096, first with the set's pages dropped from the page cache (posix_fadvise DONTNEED on its
files only: reads come from disk), then again with them cached (--prefetch-ab instead: cold reads with and without the reader's madvise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.data import env
from benchmarks.data.corpus import prepared_set, text_corpus

H200_TOKENS_PER_S = 160_000  # what one H200 consumes training the 0.5B (README: 136-158k tokens/s measured)
TINY = ["--model", "tiny", "--device", "cpu", "--seq-length", "512", "--global-batch-size", "8",
        "--micro-batch-size", "8", "--warmup-steps", "1", "--num-steps", "1"]


def _child(args: list[str]) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data", *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", FORGE_ENGINE_PROGRESS="0"), cwd=env.ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = round(wall, 3)
    return out


def startup_child(path: Path, text: bool) -> dict:
    """Run in a fresh process: open the set (a prepared set; `text`: a JSONL corpus tokenized at start-up, the
    on-the-fly path), then the whole pretrain command, then report peak RSS."""
    import resource

    from train_engine_0_5b.cli import app
    from train_engine_0_5b.data import open_prepared

    out = {}
    if not text:
        t = time.perf_counter()
        data = open_prepared([str(path)], None, None, 0.0, None, 512, 0, True, 4096)
        out["open_prepared_s"] = round(time.perf_counter() - t, 4)
        out["tokens"], out["shards"] = data.rows.components[0].data.n_tokens, len(data.rows.components[0].data.manifest.shards)
    t = time.perf_counter()
    app(["pretrain", *TINY, "--hf-dataset" if text else "--prepared-data", str(path)], standalone_mode=False)
    out["pretrain_command_s"] = round(time.perf_counter() - t, 3)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _drop_cache(path: Path) -> None:
    for f in path.glob("shard_*.tokens"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a set just written) cannot be dropped until written back
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loader_child(path: Path, vocab: int, seconds: float, cold: bool, prefetch: bool = True) -> dict:
    """Run in a fresh process: tokens/s of Loader.batch on one thread (`prefetch` False: without the reader's
    madvise(WILLNEED) of a batch's rows, for the A/B)."""
    import torch

    from train_engine_0_5b.data import open_prepared, shards

    if not prefetch:
        shards.PreparedSet.prefetch = lambda self, start, n: None

    torch.set_num_threads(1)
    if cold:
        _drop_cache(path)
    seq, rows = 4096, 8
    loader = open_prepared([str(path)], None, None, 0.0, None, seq, 0, True, vocab).loader(rows, 0, 1)
    steps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        loader.batch(steps)
        steps += 1
    dt = time.perf_counter() - t
    tps = steps * rows * seq / dt
    return {"page_cache": "dropped first (cold)" if cold else "warm", "madvise_willneed": prefetch, "seq_length": seq, "rows_per_batch": rows,
            "batches": steps, "seconds": round(dt, 3), "tokens_per_s": round(tps),
            "x_h200_0.5b": round(tps / H200_TOKENS_PER_S, 2)}


def run(work: Path, sizes_gb: list[float], loader_seconds: float, on_the_fly_mb: int, prefetch_ab: bool = False) -> dict:
    rows = []
    if on_the_fly_mb:  # the path before prepare-data, for contrast: every start tokenizes the corpus in RAM
        corpus = text_corpus(work / "corpus.jsonl", on_the_fly_mb << 20)
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")  # the child's Arrow copy stays in the scratch folder
        try:
            rows.append({"on_the_fly_text_mb": on_the_fly_mb, "load_avg_before": env.load(),
                         "startup": _child(["_startup-child", str(corpus), "--text"])})
        finally:
            os.environ.pop("HF_DATASETS_CACHE")
            corpus.unlink()
    for gb in sizes_gb:
        for vocab in (4096, 73_448):
            if (vocab != 4096 and gb != max(sizes_gb)) or (prefetch_ab and vocab == 4096):
                continue  # uint32 (the 0.5B's vocabulary): the loader on the largest set only; the A/B: uint32 only
            path = work / f"set_{gb:g}gb_v{vocab}"
            t = time.perf_counter()
            prepared_set(path, int(gb * 1e9), vocab_size=vocab)
            row = {"size_gb": gb, "vocab_size": vocab, "dtype": "uint16" if vocab <= 65_536 else "uint32",
                   "write_s": round(time.perf_counter() - t, 1), "load_avg_before": env.load()}
            try:
                if vocab == 4096 and not prefetch_ab:
                    row["startup"] = _child(["_startup-child", str(path)])
                modes = [(True, True), (False, True)]
                if prefetch_ab:  # cold reads with and without madvise, alternated, twice
                    modes = [(True, False), (True, True), (True, False), (True, True)]
                row["loader"] = [_child(["_loader-child", str(path), "--vocab", str(vocab), "--seconds", str(loader_seconds),
                                         *(["--cold"] if cold else []), *([] if prefetch else ["--no-prefetch"])])
                                 for cold, prefetch in modes]
            finally:
                shutil.rmtree(path)
            rows.append(row)
    return {"rows": rows, "h200_tokens_per_s": H200_TOKENS_PER_S, "target": "loader >= 10x one H200 on one core"}
