"""Retries for API calls: what is worth retrying, what is fatal, and waits that respect the round's deadline.

Transient (retried with exponential backoff; a Retry-After header wins): 408, 409, 425, 429, 5xx, 529,
timeouts, dropped connections, and malformed replies (a 200 whose body is not the protocol's JSON). A
fault that outlasts every retry raises AgentUnavailable: the run stops without spending the round.
Fatal (AgentFatal, never retried, the run stops): 401, 403 (the key), 404 (an unknown model or endpoint).
Anything else (400, a bad request) is not retried either: it is the round's error. No wait ever runs past
the round's deadline: DeadlineReached instead.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from harness.agents.base import AgentFatal, AgentUnavailable
from harness.secrets import redact

T = TypeVar("T")
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
FATAL_STATUS = {401: "the service refused the key", 403: "the key may not use this service or model",
                404: "unknown model or endpoint"}


class MalformedReply(Exception):
    """A reply that is not the protocol's JSON (or lacks its fields): retried like a service fault."""


class DeadlineReached(Exception):
    """A wait (backoff or Retry-After) would end after the round's deadline."""


def is_transient(exc: BaseException) -> bool:
    """True for faults of the anthropic / openai SDKs (and plain network errors) worth retrying."""
    if isinstance(exc, MalformedReply):
        return True
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status in RETRY_STATUS
    name = type(exc).__name__
    return name in {"APIConnectionError", "APITimeoutError", "ConnectionError", "TimeoutError",
                    "ConnectTimeout", "ReadTimeout", "RemoteProtocolError", "APIResponseValidationError"}


def fatal(exc: BaseException) -> AgentFatal | None:
    """The AgentFatal an SDK error amounts to, if it is one (its message redacted: a 401 may echo the key)."""
    status = getattr(exc, "status_code", None)
    if status not in FATAL_STATUS:
        return None
    return AgentFatal(f"{FATAL_STATUS[status]} (HTTP {status}): {redact(str(exc))[:300]}")


def call_with_retries(fn: Callable[[], T], *, retries: int = 6, base_s: float = 2.0, max_s: float = 120.0,
                      deadline: float = float("inf"),
                      on_retry: Callable[[int, BaseException, float], None] = lambda n, e, s: None,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `fn`; on a transient fault wait base_s * 2**n (+ jitter, capped at max_s; a Retry-After header
    wins) and try again, `retries` times at most. `deadline` is a time.monotonic() value."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified just below
            f = fatal(e)
            if f is not None:
                raise f from e
            if not is_transient(e):
                raise
            if attempt == retries:
                raise AgentUnavailable(f"service fault persisted after {retries} retries: {type(e).__name__}: "
                                       f"{redact(str(e))[:200]}") from e
            wait = max(min(max_s, base_s * 2**attempt) * (1 + 0.1 * random.random()), _retry_after(e))
            if time.monotonic() + wait > deadline:
                raise DeadlineReached(f"the service asked for a {wait:.0f} s wait ({type(e).__name__}); "
                                      "the round's time ends before that") from e
            on_retry(attempt + 1, e, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def _retry_after(exc: BaseException) -> float:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        return min(float(headers.get("retry-after", 0)), 300.0)
    except (TypeError, ValueError):
        return 0.0
