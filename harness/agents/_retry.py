"""Retry with exponential backoff for API faults (429, 5xx, timeouts, dropped connections).

A fault that outlasts every retry raises AgentUnavailable: the loop then stops without spending the
round. Anything else (400, 401, a bad request) is not retried: it would fail the same way again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from harness.agents.base import AgentUnavailable

T = TypeVar("T")
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


def is_transient(exc: BaseException) -> bool:
    """True for faults of the anthropic / openai SDKs (and plain network errors) worth retrying."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status in RETRY_STATUS
    name = type(exc).__name__
    return name in {"APIConnectionError", "APITimeoutError", "ConnectionError", "TimeoutError",
                    "ConnectTimeout", "ReadTimeout", "RemoteProtocolError"}


def call_with_retries(fn: Callable[[], T], *, retries: int = 6, base_s: float = 2.0, max_s: float = 120.0,
                      on_retry: Callable[[int, BaseException, float], None] = lambda n, e, s: None,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `fn`; on a transient fault wait base_s * 2**n (+ jitter, capped at max_s; a Retry-After
    header wins when the server sends one) and try again, `retries` times at most."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified just below
            if not is_transient(e):
                raise
            if attempt == retries:
                raise AgentUnavailable(f"service fault persisted after {retries} retries: {type(e).__name__}: "
                                       f"{str(e)[:200]}") from e
            wait = min(max_s, base_s * 2**attempt) * (1 + 0.1 * random.random())
            wait = max(wait, _retry_after(e))
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
