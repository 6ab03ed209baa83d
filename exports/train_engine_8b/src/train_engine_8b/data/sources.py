"""Where documents come from: the shipped default corpus, a local dataset (a file or directory of
Parquet / Arrow / JSON / JSONL / text, or a `save_to_disk` directory) through `datasets`, or a Hub
name. A Hub name is tried only when the Hub answers within FORGE_ENGINE_HUB_TIMEOUT_S; offline or
unreachable, it fails at once with a message that names the local alternatives.

Each source yields batches of records (a dict of column -> list); `render` turns them into texts,
either the `text` column or `--hf-text-template` filled from the record's fields.
"""

from __future__ import annotations

import gzip
import json
import os
import string
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..core import env
from ..core.errors import EngineError

DEFAULT_CORPUS = Path(__file__).with_name("default_corpus.jsonl.gz")
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
LOCAL_HINT = ("pass a local file or directory of Parquet, Arrow, JSON/JSONL or text files with --hf-dataset, "
              "or omit --hf-dataset to train on the shipped default corpus")
BATCH = 1000  # records per batch

Records = dict[str, list]


@dataclass
class Source:
    name: str  # for messages and logs
    columns: list[str]
    num_rows: int  # -1: a stream, unknown until read
    batches: Callable[[], Iterator[Records]]


def _builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def default_corpus() -> Source:
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    columns = list(rows[0]) if rows else []

    def batches() -> Iterator[Records]:
        for i in range(0, len(rows), BATCH):
            chunk = rows[i : i + BATCH]
            yield {c: [r.get(c) for r in chunk] for c in columns}

    return Source(f"default corpus ({DEFAULT_CORPUS.name})", columns, len(rows), batches)


def _from_dataset(name: str, ds) -> Source:
    """A Dataset, or a streamed IterableDataset (num_rows -1: unknown until read)."""
    columns = ds.column_names
    if columns is None:  # a streamed JSON or text file names its columns only once read
        try:
            columns = list(next(iter(ds.take(1)), {}))
        except Exception as e:  # datasets raises many types for unreadable files
            raise EngineError(f"cannot read dataset {name}: {type(e).__name__}: {e}") from None
        if not columns:
            raise EngineError(f"dataset {name} is empty (0 rows)")
    return Source(name, list(columns), getattr(ds, "num_rows", -1), lambda: ds.iter(batch_size=BATCH))


def _datasets():
    """`datasets`, imported on first use (the default corpus does not need it), quiet on ranks > 0."""
    import datasets

    if env.torchrun_world()[0] > 0:
        datasets.disable_progress_bars()
    return datasets


def is_saved_dataset(path: Path) -> bool:
    """A `save_to_disk` directory (read with load_from_disk, memory-mapped)."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def local_files(path: Path) -> tuple[list[Path], str | None]:
    """The data files of a local dataset and their `datasets` builder (None for a save_to_disk directory)."""
    if is_saved_dataset(path):
        return sorted(f for f in path.rglob("*") if f.is_file()), None
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
        files = [f for f in files if _builder(f)]
        if not files:
            raise EngineError(f"dataset directory {path} holds no Parquet, Arrow, JSON/JSONL or text files")
        kinds = {_builder(f) for f in files}
        if len(kinds) > 1:
            raise EngineError(f"dataset directory {path} mixes formats ({', '.join(sorted(kinds))}); keep one per directory")
    else:
        if _builder(path) is None:
            raise EngineError(f"dataset file {path}: unknown format (expected one of {', '.join(BUILDERS)}, optionally compressed)")
        files, kinds = [path], {_builder(path)}
    if all(f.stat().st_size == 0 for f in files):
        raise EngineError(f"dataset {path} is empty (its files have no bytes)")
    return files, kinds.pop()


def _local(path: Path, split: str, streaming: bool = False) -> Source:
    datasets = _datasets()
    files, builder = local_files(path)
    if builder is None:
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise EngineError(f"dataset {path} has no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
        return _from_dataset(str(path), ds)
    try:  # streaming reads the files in place (no Arrow cache copy): what prepare-data does with a large corpus
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming)
        return _from_dataset(str(path), ds)
    except EngineError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        raise EngineError(f"cannot read dataset {path}: {type(e).__name__}: {e}") from None


PREPARE_HINT = ("pass a local file or directory of Parquet, Arrow, JSON/JSONL or text files with --input (e.g. "
                "`huggingface-cli download --repo-type dataset NAME --local-dir DIR` where the Hub is reachable, "
                "then --input DIR)")


def _check_hub(name: str, option: str = "--hf-dataset", hint: str = LOCAL_HINT) -> None:
    """Fail fast, naming the local alternatives, when the Hub is offline or does not answer in time."""
    if env.hub_offline():
        raise EngineError(f"{option} {name!r} is not a local path and the Hugging Face Hub is offline "
                          f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set): {hint}")
    timeout = env.hub_timeout_s()
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/api/datasets/{name}"
    result: dict = {}

    def ask() -> None:  # in a thread: a DNS lookup ignores urlopen's timeout
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result["status"] = 200
        except urllib.error.HTTPError as e:
            result["status"] = e.code
        except Exception as e:  # refused, unresolvable, timed out
            result["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if "status" not in result:
        reason = result.get("error", f"no answer in {timeout:g} s")
        raise EngineError(f"{option} {name!r} is not a local path and the Hugging Face Hub cannot be reached "
                          f"({reason}): {hint}")
    if result["status"] == 404:
        raise EngineError(f"{option} {name!r}: no such local path, and no such dataset on the Hub")


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or _builder(Path(spec)) is not None or spec.count("/") > 1


def open_source(spec: str | None, config: str | None = None, split: str = "train", streaming: bool = False) -> Source:
    """The documents named by --hf-dataset (None: the shipped default corpus); `streaming` reads local files in
    place and a Hub dataset as a stream (prepare-data), instead of through an Arrow copy."""
    if spec is None:
        return default_corpus()
    path = Path(spec).expanduser()
    if path.exists():
        source = _local(path, split, streaming)
    elif _looks_local(spec):
        raise EngineError(f"dataset path {spec} does not exist")
    else:
        _check_hub(spec)
        try:
            source = _from_dataset(spec, _datasets().load_dataset(spec, config, split=split, streaming=streaming))
        except Exception as e:
            raise EngineError(f"cannot load Hub dataset {spec!r}: {type(e).__name__}: {e}; {LOCAL_HINT}") from None
    if source.num_rows == 0:
        raise EngineError(f"dataset {source.name} is empty (0 rows)")
    return source


def template_fields(template: str) -> list[str]:
    """The record fields a template names: '{question}' and '{meta[id]}' name question and meta."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise EngineError(f"--hf-text-template {template!r} is not a valid format string: {e}") from None
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = name.split(".")[0].split("[")[0]
        if not base or base.isdigit():
            raise EngineError(f"--hf-text-template {template!r}: every field needs a name, e.g. {{question}}")
        fields.append(base)
    return fields


def renderer(source: Source, template: str | None) -> Callable[[Records], list[str]]:
    """Records -> texts; checks up front that every field the template (or the default `text`) names exists."""
    if template is None:
        if "text" not in source.columns:
            raise EngineError(f"dataset {source.name} has no 'text' column (columns: {', '.join(source.columns)}); "
                              "pass --hf-text-template, e.g. \"Question: {question}\\nAnswer: {answer}\"")
        return lambda batch: ["" if t is None else str(t) for t in batch["text"]]
    template = template.replace("\\n", "\n").replace("\\t", "\t")  # shells pass "\n" as two characters
    fields = template_fields(template)
    missing = [f for f in dict.fromkeys(fields) if f not in source.columns]
    if missing:
        raise EngineError(f"--hf-text-template names field(s) {', '.join(map(repr, missing))} that dataset "
                          f"{source.name} does not have (columns: {', '.join(source.columns)})")
    used = list(dict.fromkeys(fields))

    def render(batch: Records) -> list[str]:
        n = len(batch[used[0]]) if used else len(next(iter(batch.values())))
        return [template.format(**{f: batch[f][i] for f in used}) for i in range(n)]

    return render
