"""The environment an agent's processes get: only what the spec allows, never a key or a token."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL|AUTH)", re.IGNORECASE)


def agent_env(allow: Sequence[str], extra: Mapping[str, str] | None = None,
              source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The names in `allow` copied from `source` (default os.environ) plus `extra`; any name that
    looks like a secret is dropped even if a spec allowed it."""
    source = os.environ if source is None else source
    env = {k: source[k] for k in allow if k in source and not SECRET_NAME.search(k)}
    env.update({k: v for k, v in (extra or {}).items() if not SECRET_NAME.search(k)})
    env.setdefault("PATH", os.defpath)
    return env


def secret_values(source: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking variables in the harness's environment (for redaction)."""
    source = os.environ if source is None else source
    return sorted({v for k, v in source.items() if SECRET_NAME.search(k) and len(v) >= 8}, key=len, reverse=True)


def redact(text: str, secrets: Sequence[str] | None = None) -> str:
    """`text` with every secret value replaced by [redacted]."""
    for s in secrets if secrets is not None else secret_values():
        text = text.replace(s, "[redacted]")
    return text


@contextmanager
def secrets_withheld() -> Iterator[list[str]]:
    """Remove secret-looking variables from os.environ for the duration (restored after). The gates run
    agent-written engine code in subprocesses that inherit the harness's environment: keys must not be
    in it then."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if SECRET_NAME.search(k)}
    try:
        yield sorted(saved)
    finally:
        os.environ.update(saved)
