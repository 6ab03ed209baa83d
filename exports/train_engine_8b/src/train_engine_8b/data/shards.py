"""Prepared datasets on disk (written by `prepare-data`, read by `pretrain --prepared-data`).

A prepared dataset is a directory:

    manifest.json              the index: format, token dtype, tokenizer, sources, every shard (written last)
    tokenizer/                 a copy of the tokenizer files the tokens came from
    shard_00000.tokens         raw little-endian uint16 (vocabulary <= 65,536) or uint32 token ids
    shard_00000.docs.npy       int64 document starts within the shard (n_docs + 1 entries; every document ends in EOS)
    shard_00000.json           that shard's record (what the manifest lists), written once its files are complete

The dataset's token stream is its shards' tokens in shard order. Opening one (`PreparedSet.open`) reads the
manifest and stats each shard file: O(shards), never O(tokens), so start-up stays flat as the corpus grows;
a truncated shard fails there. Tokens are read by memmap; every read is range-checked against the
vocabulary (a corrupt shard fails at the batch that touches it), and `verify` rehashes every file.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ..core.errors import EngineError

FORMAT = "forge-tokens/1"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
HASH_CHUNK = 8 << 20


class SourceRecord(BaseModel):
    """One input of prepare-data: a local file set (each file hashed) or a Hub dataset (name, config, split, revision)."""

    model_config = ConfigDict(extra="forbid")
    spec: str
    kind: str  # "local" | "hub"
    files: list[tuple[str, int, str]] = []  # (path, bytes, blake2b)
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    text_template: str | None = None


class ShardRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    n_tokens: int
    n_docs: int
    tokens_blake2b: str
    docs_blake2b: str


class Plan(BaseModel):
    """What determines a prepared dataset's content: a resumed prepare-data must match it exactly."""

    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    dtype: str  # "uint16" | "uint32"
    vocab_size: int
    eos_id: int
    tokenizer_fingerprint: str
    sources: list[SourceRecord]
    docs_per_shard: int  # a shard ends at this many documents or at shard_chars characters of text
    shard_chars: int = 0


class Manifest(Plan):
    shards: list[ShardRecord]
    n_tokens: int
    n_docs: int

    @property
    def id(self) -> str:
        """Content identity: the plan and every shard's hashes (not paths or timestamps)."""
        return hashlib.blake2b(self.model_dump_json().encode(), digest_size=8).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_shard(out: Path, index: int, tokens: np.ndarray, doc_starts: np.ndarray) -> ShardRecord:
    """Write one shard's files, then its record (the record's presence means the files are complete)."""
    base = out / shard_name(index)
    tok_path, docs_path = base.with_suffix(".tokens"), base.with_suffix(".docs.npy")
    _atomic_write(tok_path, np.ascontiguousarray(tokens).astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())
    tmp = docs_path.with_name(f".tmp-{docs_path.name}")
    with tmp.open("wb") as f:
        np.save(f, doc_starts.astype(np.int64))
    os.replace(tmp, docs_path)
    record = ShardRecord(index=index, n_tokens=len(tokens), n_docs=len(doc_starts) - 1,
                         tokens_blake2b=file_hash(tok_path), docs_blake2b=file_hash(docs_path))
    _atomic_write(base.with_suffix(".json"), record.model_dump_json().encode())
    return record


def read_shard_record(out: Path, index: int) -> ShardRecord | None:
    """A finished shard's record if its files are all there and hash to it (else None: prepare it again)."""
    base = out / shard_name(index)
    try:
        record = ShardRecord.model_validate_json(base.with_suffix(".json").read_bytes())
    except (OSError, ValidationError):
        return None
    tok_path, docs_path = base.with_suffix(".tokens"), base.with_suffix(".docs.npy")
    if not (tok_path.is_file() and docs_path.is_file()):
        return None
    if file_hash(tok_path) != record.tokens_blake2b or file_hash(docs_path) != record.docs_blake2b:
        return None
    return record


def write_manifest(out: Path, manifest: Manifest) -> None:
    _atomic_write(out / MANIFEST, (manifest.model_dump_json(indent=1) + "\n").encode())


def read_manifest(path: Path) -> Manifest:
    file = path / MANIFEST
    if not path.is_dir():
        raise EngineError(f"prepared dataset {path}: no such directory (make one with `prepare-data --out {path} ...`)")
    if not file.is_file():
        partial = any(path.glob("shard_*.json"))
        why = ("an unfinished prepare-data run (run the same command again to resume it)" if partial
               else "not a prepared dataset (make one with `prepare-data`)")
        raise EngineError(f"prepared dataset {path}: no {MANIFEST}: {why}")
    try:
        manifest = Manifest.model_validate_json(file.read_bytes())
    except ValidationError as e:
        raise EngineError(f"prepared dataset {path}: {MANIFEST} is not a valid manifest ({e.error_count()} error(s): "
                          f"{e.errors()[0]['loc']}: {e.errors()[0]['msg']})") from None
    if manifest.format != FORMAT:
        raise EngineError(f"prepared dataset {path}: format {manifest.format!r}; this engine reads {FORMAT!r}")
    return manifest


class PreparedSet:
    """One prepared dataset's token stream, read by memmap (`tokens(start, n)`)."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path, self.manifest = path, manifest
        self.dtype = np.dtype(manifest.dtype)
        sizes = np.array([s.n_tokens for s in manifest.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # where each shard starts in the stream
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}

    @classmethod
    def open(cls, path: Path) -> "PreparedSet":
        """Read the manifest and check every shard's files exist at their recorded sizes (O(shards))."""
        manifest = read_manifest(path)
        if np.dtype(manifest.dtype) != token_dtype(manifest.vocab_size):
            raise EngineError(f"prepared dataset {path}: dtype {manifest.dtype} does not fit vocabulary {manifest.vocab_size}")
        itemsize = np.dtype(manifest.dtype).itemsize
        for s in manifest.shards:
            base = path / shard_name(s.index)
            for f, want in ((base.with_suffix(".tokens"), s.n_tokens * itemsize), (base.with_suffix(".docs.npy"), None)):
                if not f.is_file():
                    raise EngineError(f"prepared dataset {path}: {f.name} is missing (the manifest lists it); "
                                      "rerun prepare-data into a new --out")
                if want is not None and f.stat().st_size != want:
                    raise EngineError(f"prepared dataset {path}: {f.name} is truncated or corrupt ({f.stat().st_size} "
                                      f"bytes; the manifest says {s.n_tokens} tokens = {want} bytes); rerun prepare-data "
                                      "into a new --out")
        if sum(s.n_tokens for s in manifest.shards) != manifest.n_tokens:
            raise EngineError(f"prepared dataset {path}: the manifest's shard sizes do not add up to its n_tokens")
        return cls(path, manifest)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def _map(self, shard: int) -> np.ndarray:
        """The shard's tokens, memory-mapped (mmap itself rather than np.memmap: `prefetch` needs its madvise)."""
        if shard not in self._maps:
            f = (self.path / shard_name(self.manifest.shards[shard].index)).with_suffix(".tokens")
            with f.open("rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[shard] = (mm, np.frombuffer(mm, dtype=self.dtype.newbyteorder("<")))
        return self._maps[shard][1]

    def prefetch(self, start: int, n: int) -> None:
        """Ask the kernel to read tokens [start, start + n) now (MADV_WILLNEED): called for every row of a batch
        before any is copied, a batch's random reads reach the disk together instead of one after another."""
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        end = start + n
        while start < end:
            self._map(shard)
            lo = (start - int(self.offsets[shard])) * self.dtype.itemsize
            hi = (min(end, int(self.offsets[shard + 1])) - int(self.offsets[shard])) * self.dtype.itemsize
            page = lo - lo % mmap.PAGESIZE
            self._maps[shard][0].madvise(mmap.MADV_WILLNEED, page, hi - page)
            start = int(self.offsets[shard + 1])
            shard += 1

    def tokens(self, start: int, n: int, out: np.ndarray) -> None:
        """Stream tokens [start, start + n) into `out` (int64, length n), checked against the vocabulary."""
        done = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while done < n:
            lo = start + done - int(self.offsets[shard])
            piece = self._map(shard)[lo : lo + n - done]
            if len(piece) and int(piece.max()) >= self.manifest.vocab_size:
                name = shard_name(self.manifest.shards[shard].index)
                raise EngineError(f"prepared dataset {self.path}: {name}.tokens holds token id {int(piece.max())} >= "
                                  f"its vocabulary {self.manifest.vocab_size}: the shard is corrupt (check every "
                                  f"shard with `prepare-data --verify {self.path}`; rerun prepare-data into a new --out)")
            out[done : done + len(piece)] = piece
            done += len(piece)
            shard += 1


def verify(path: Path) -> Manifest:
    """Rehash every shard file against the manifest and check every document ends in EOS (reads everything)."""
    ps = PreparedSet.open(path)
    m = ps.manifest
    for i, s in enumerate(m.shards):
        base = path / shard_name(s.index)
        for f, want in ((base.with_suffix(".tokens"), s.tokens_blake2b), (base.with_suffix(".docs.npy"), s.docs_blake2b)):
            if file_hash(f) != want:
                raise EngineError(f"prepared dataset {path}: {f.name} does not match its hash in the manifest: corrupt; "
                                  "rerun prepare-data into a new --out")
        starts = np.load(base.with_suffix(".docs.npy"))
        toks = ps._map(i)
        if len(starts) != s.n_docs + 1 or starts[0] != 0 or starts[-1] != s.n_tokens or \
                (s.n_docs and not bool((toks[starts[1:] - 1] == m.eos_id).all())):
            raise EngineError(f"prepared dataset {path}: {base.name}'s document boundaries do not match its tokens: corrupt")
    return m

