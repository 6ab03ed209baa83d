"""Secrets: where API keys live in a forge process, and the one redaction filter for everything it stores.

Keys are read once from the environment into `VAULT` and removed from `os.environ`, so no child (an
agent, a tool command, a gate's engine, `train`'s ranks) inherits them; only the code that calls an API
asks the vault. The CLI also `seal`s its process: the keys' bytes in the process's initial environment
block (what `/proc/<pid>/environ` shows) are zeroed, and the process is made non-dumpable, so a process of
the same user cannot read that file or the process's memory (root still can: rounds and engines run
sandboxed in their own PID namespace, where forge's /proc is not visible at all).

`redact` is the one filter: the exact values of every key the vault or the environment holds, plus the
token shapes of the common services (a key that was never in this process's environment is still caught).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Environment names that hold secrets: never passed to a child, always redacted.
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL|AUTH)", re.IGNORECASE)
MIN_SECRET = 8  # shorter values are not redacted by value (they would match everywhere)
# The model services' keys: only the process that calls the service holds one, never a training rank.
AGENT_KEYS = frozenset({"ANTHROPIC_API_KEY", "OPENAI_API_KEY", "CODEX_API_KEY"})
MARK = "[redacted]"
# Known token shapes (services' API keys and tokens, bearer headers, private keys).
TOKEN_PATTERNS = (
    r"\bsk-[A-Za-z0-9][A-Za-z0-9_\-]{19,}",                 # Anthropic (sk-ant-...), OpenAI (sk-..., sk-proj-...)
    r"\bgh[pousr]_[A-Za-z0-9]{30,}", r"\bgithub_pat_[A-Za-z0-9_]{30,}",
    r"\bglpat-[A-Za-z0-9_\-]{20,}", r"\bxox[abposr]-[A-Za-z0-9\-]{10,}",
    r"\bhf_[A-Za-z0-9]{30,}", r"\bAKIA[0-9A-Z]{16}\b", r"\bAIza[0-9A-Za-z_\-]{35}",
    r"(?<=[Bb]earer )[A-Za-z0-9._~+/\-]{20,}=*",
    r"(?<=x-api-key: )[^\s\"']{16,}", r"(?<=\"x-api-key\": \")[^\"]{16,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
)
_TEXT = re.compile("|".join(f"(?:{p})" for p in TOKEN_PATTERNS))
_BYTES = re.compile("|".join(f"(?:{p})" for p in TOKEN_PATTERNS).encode())


class Vault:
    """The keys of this process, out of `os.environ`."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def take(self, environ: Any = None) -> list[str]:
        """Move every secret-named variable of `environ` (default os.environ) into the vault."""
        environ = os.environ if environ is None else environ
        names = [k for k in list(environ) if SECRET_NAME.search(k)]
        for k in names:
            self._values[k] = environ.pop(k)
        return names

    def give_back(self, names: list[str]) -> None:
        for k in names:
            if k in self._values:
                os.environ[k] = self._values.pop(k)

    def get(self, name: str) -> str | None:
        """A key: from the vault, else from the environment (code that never went through `take`)."""
        return self._values.get(name) or os.environ.get(name) or None

    def held(self) -> dict[str, str]:
        """Every secret this process holds, by name (the vault's and any still in the environment)."""
        return {k: v for k, v in os.environ.items() if SECRET_NAME.search(k)} | self._values

    def values(self) -> list[str]:
        found = {v for v in self._values.values()} | {v for k, v in os.environ.items() if SECRET_NAME.search(k)}
        return sorted((v for v in found if len(v) >= MIN_SECRET), key=len, reverse=True)


VAULT = Vault()


def redact(text: str) -> str:
    """`text` with every known key value and every token-shaped string replaced by [redacted]."""
    for v in VAULT.values():
        text = text.replace(v, MARK)
    return _TEXT.sub(MARK, text)


def redact_bytes(data: bytes) -> bytes:
    for v in VAULT.values():
        data = data.replace(v.encode(), MARK.encode())
    return _BYTES.sub(MARK.encode(), data)


def holds_secret(data: bytes) -> bool:
    return redact_bytes(data) != data


def redact_file(path: Path) -> bool:
    """Rewrite `path` redacted when it holds a secret; True when it did."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    clean = redact_bytes(data)
    if clean == data:
        return False
    path.write_bytes(clean)
    return True


def redact_tree(root: Path) -> list[Path]:
    """Redact every regular file under `root` (a round's logs and reports); the files it rewrote."""
    return [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and redact_file(p)]


def child_env(source: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment for a child process: `source` (default os.environ) without any secret-named variable."""
    source = os.environ if source is None else source
    return {k: v for k, v in source.items() if not SECRET_NAME.search(k)} | extra


def train_env(**extra: str) -> dict[str, str]:
    """The environment of the user's own training job: its own tokens (a W&B or HF token) pass, an agent
    service's key never does."""
    return child_env() | {k: v for k, v in VAULT.held().items() if k not in AGENT_KEYS} | extra


@contextmanager
def withheld() -> Iterator[list[str]]:
    """The keys in the vault, not in os.environ, for the duration (library callers get them back after)."""
    names = VAULT.take()
    try:
        yield names
    finally:
        VAULT.give_back(names)


def seal() -> list[str]:
    """For the CLI process, once, first: keys into the vault for good, their bytes gone from the initial
    environment block, and the process non-dumpable. Returns the names moved."""
    names = VAULT.take()
    _zero_initial_environ(names)
    _libc_prctl(4, 0)  # PR_SET_DUMPABLE 0: /proc/<pid>/environ and mem become unreadable to other users' peers
    return names


def _libc_prctl(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _zero_initial_environ(names: list[str]) -> None:
    """Overwrite `NAME=value` of `names` in the environment block the kernel shows as /proc/self/environ
    (glibc's environ no longer points there: os.environ.pop unset them)."""
    if not names:
        return
    try:
        stat = Path("/proc/self/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50 and 51 of proc(5))
    except (OSError, ValueError, IndexError):
        return
    block = ctypes.string_at(start, end - start)
    offset = 0
    for entry in block.split(b"\0"):
        name = entry.partition(b"=")[0].decode(errors="replace")
        if name in names:
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1


class RedactedStream:
    """sys.stderr (looked up at each write, as tests swap it), redacted: the console may quote a service's error."""

    def write(self, text: str) -> int:
        return sys.stderr.write(redact(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(sys.stderr, name)
