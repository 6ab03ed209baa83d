"""`prepare-data`: tokenize a corpus once into memory-mapped token shards (shards.py has the format).

The inputs' documents, in input order then record order, are cut into chunks of `shard_mb` MB of text (or
`docs_per_shard` documents, whichever comes first; an empty document is skipped); chunk i becomes shard i,
tokenized by a pool of worker processes (with one worker, by this process). The cut depends on the documents
alone, so the output is the same for any number of workers, and a rerun of the same command resumes:
a shard whose files hash to its record is kept, anything else is prepared again. The plan (tokenizer, inputs
and their hashes, dtype, chunk size) is written first; a rerun with other inputs into the same --out is refused.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..core import env
from ..core.errors import EngineError
from . import shards
from .shards import Manifest, Plan, ShardRecord, SourceRecord
from .sources import PREPARE_HINT, _check_hub, _looks_local, local_files, open_source, renderer
from .tokenizer import TextTokenizer

PLAN = "plan.json"
ENCODE_BATCH = 1000  # texts per encode_batch call inside a worker


@dataclass
class PrepareResult:
    manifest: Manifest
    seconds: float
    reused: int  # shards kept from an earlier, interrupted run


def _source_record(spec: str, config: str | None, split: str, template: str | None) -> SourceRecord:
    path = Path(spec).expanduser()
    if path.exists():
        files, _ = local_files(path)
        return SourceRecord(spec=str(path), kind="local", split=split, text_template=template,
                            files=[(str(f), f.stat().st_size, shards.file_hash(f)) for f in files])
    if _looks_local(spec):
        raise EngineError(f"dataset path {spec} does not exist")
    _check_hub(spec, "--input", PREPARE_HINT)  # offline or unreachable: fails now, naming the local alternative
    return SourceRecord(spec=spec, kind="hub", config=config, split=split, text_template=template,
                        revision=_hub_revision(spec))


def _hub_revision(name: str) -> str | None:
    """The dataset's current commit on the Hub: recorded, so a resumed run refuses a dataset that has changed."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, timeout=env.hub_timeout_s()).sha
    except Exception:  # noqa: BLE001  (a private or gated dataset, a flaky answer: the name is still recorded)
        return None


def _documents(specs: list[str], config: str | None, split: str, template: str | None) -> Iterator[str]:
    """Every non-empty document of the inputs, in order."""
    for spec in specs:
        source = open_source(spec, config, split, streaming=True)
        render = renderer(source, template)
        for batch in source.batches():
            for text in render(batch):
                if text.strip():  # an empty document would be a lone EOS
                    yield text


def _chunks(docs: Iterator[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Consecutive documents, up to max_docs of them or until they hold max_chars characters."""
    chunk: list[str] = []
    chars = 0
    for d in docs:
        chunk.append(d)
        chars += len(d)
        if len(chunk) == max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


_TOKENIZER: TextTokenizer | None = None  # one per worker process, loaded by _init_worker


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    _TOKENIZER = TextTokenizer(tokenizer_dir)


def tokenize(tokenizer: TextTokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens with EOS after each document, document starts) of `texts`."""
    pieces = []
    for i in range(0, len(texts), ENCODE_BATCH):
        pieces += [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts[i : i + ENCODE_BATCH])]
    lengths = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.empty(int(starts[-1]), dtype=dtype)
    for p, s in zip(pieces, starts[:-1]):
        tokens[s : s + len(p)] = p
    tokens[starts[1:] - 1] = tokenizer.eos_id
    return tokens, starts


def _work(out: str, index: int, texts: list[str], dtype: str) -> ShardRecord:
    tokens, starts = tokenize(_TOKENIZER, texts, np.dtype(dtype))
    return shards.write_shard(Path(out), index, tokens, starts)


class _InProcess:
    """The pool's interface for --workers 1: tokenize in this process (no second process, no pickled texts)."""

    def __init__(self, tokenizer_dir: str):
        _init_worker(tokenizer_dir)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def __enter__(self) -> "_InProcess":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _check_plan(out: Path, plan: Plan) -> None:
    """Write the plan, or check that an earlier run's plan is this one (else its shards are another corpus's)."""
    path = out / PLAN
    if path.is_file():
        try:
            old = Plan.model_validate_json(path.read_bytes())
        except ValidationError:
            old = None
        if old != plan:
            raise EngineError(f"--out {out} holds a prepare-data run of other inputs, tokenizer or settings ({PLAN} "
                              "differs); choose another --out, or delete it to start over")
        return
    if out.exists() and any(out.iterdir()):
        raise EngineError(f"--out {out} exists and is not a prepare-data output; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN).write_text(plan.model_dump_json(indent=1) + "\n")


def _progress(console: Console, total_docs: int | None) -> Progress:
    return Progress(TextColumn("prepare-data"), BarColumn(), TextColumn("{task.completed:,} docs"),
                    TextColumn("{task.fields[tokens]:,} tokens"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    console=console, disable=not env.progress_bar(console.is_terminal), transient=True)


def run(inputs: list[str], out: Path, tokenizer_path: str | None = None, config: str | None = None, split: str = "train",
        template: str | None = None, workers: int | None = None, docs_per_shard: int = 1_000_000, shard_mb: float = 32.0,
        console: Console | None = None) -> PrepareResult:
    """Prepare `inputs` into `out` (resuming an interrupted run there); returns the manifest."""
    console = console or Console(stderr=True, highlight=False)
    if not inputs:
        raise EngineError("prepare-data needs at least one --input")
    if docs_per_shard < 1 or not shard_mb > 0:
        raise EngineError(f"--docs-per-shard must be >= 1 and --shard-mb > 0 (got {docs_per_shard}, {shard_mb})")
    workers = workers or os.cpu_count() or 1
    tokenizer = TextTokenizer(tokenizer_path)
    dtype = shards.token_dtype(tokenizer.vocab_size)
    plan = Plan(dtype=dtype.name, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                tokenizer_fingerprint=tokenizer.fingerprint, docs_per_shard=docs_per_shard, shard_chars=int(shard_mb * 1e6),
                sources=[_source_record(s, config, split, template) for s in inputs])
    _check_plan(out, plan)
    if (out / shards.MANIFEST).is_file():
        manifest = shards.read_manifest(out)
        console.print(f"{out} is already prepared ({manifest.n_tokens:,} tokens); nothing to do")
        return PrepareResult(manifest, 0.0, len(manifest.shards))
    tokenizer.save(out / shards.TOKENIZER_DIR)
    start, records, reused = time.perf_counter(), {}, 0
    pending: dict[int, Future] = {}
    tok_dir = str(out / shards.TOKENIZER_DIR)
    context = get_context("fork" if sys.platform == "linux" else "spawn")  # fork: workers start without re-importing
    pool = (ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(tok_dir,))
            if workers > 1 else _InProcess(tok_dir))
    with pool, _progress(console, None) as bar:
        pool.submit(int).result()  # start (fork) the workers now, before the inputs' readers open any thread
        task = bar.add_task("prepare", total=None, tokens=0, rate="")

        def collect(index: int) -> None:
            rec = pending.pop(index).result()
            records[index] = rec
            tokens = sum(r.n_tokens for r in records.values())
            bar.update(task, advance=rec.n_docs, tokens=tokens, rate=f"{tokens / (time.perf_counter() - start):,.0f} tokens/s")

        for index, texts in enumerate(_chunks(_documents(inputs, config, split, template), docs_per_shard, plan.shard_chars)):
            kept = shards.read_shard_record(out, index)
            if kept is not None and kept.n_docs == len(texts):
                records[index], reused = kept, reused + 1
                bar.update(task, advance=kept.n_docs)
                continue
            pending[index] = pool.submit(_work, str(out), index, texts, dtype.name)
            while len(pending) > workers:  # bounded: at most workers + 1 chunks of text in memory
                collect(min(pending))
        while pending:
            collect(min(pending))
    if not records:
        raise EngineError(f"the inputs {', '.join(inputs)} hold no text: every document is empty")
    ordered = [records[i] for i in range(len(records))]
    manifest = Manifest(**plan.model_dump(), shards=ordered, n_tokens=sum(r.n_tokens for r in ordered),
                        n_docs=sum(r.n_docs for r in ordered))
    shards.write_manifest(out, manifest)
    return PrepareResult(manifest, time.perf_counter() - start, reused)

