"""A shell agent's usage file (its only usage report) is counted once: at the agent's end, or on resume when a
kill -9 of forge came first; a garbage or missing file counts nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

from harness.agents.shell import USAGE_FILE, read_usage, shell_usage_after_kill
from harness.ledger import Inflight


def test_a_kill_before_the_file_was_read_counts_it_once_and_a_counted_one_is_not_added_again(tmp_path: Path) -> None:
    tin, tout = random.randint(1, 10**6), random.randint(1, 10**5)
    (tmp_path / USAGE_FILE).write_text(json.dumps({"tokens_in": tin, "tokens_out": tout, "cost_usd": 0.25}))
    inf = Inflight(key="m1", stage="m1", round=1, worktree="w", backend="shell", outbox=str(tmp_path))
    unread = shell_usage_after_kill(inf, tmp_path)
    assert (unread.tokens_in, unread.tokens_out, unread.cost_usd) == (tin, tout, 0.25)
    read = inf.model_copy(update={"tokens_in": tin, "tokens_out": tout, "cost_usd": 0.25})
    again = shell_usage_after_kill(read, tmp_path)
    assert (again.tokens_in, again.tokens_out, again.cost_usd) == (tin, tout, 0.25)


def test_no_file_or_garbage_counts_nothing(tmp_path: Path) -> None:
    inf = Inflight(key="m1", stage="m1", round=1, worktree="w", backend="shell", tokens_in=7, tokens_out=3)
    assert shell_usage_after_kill(inf, tmp_path) == inf
    for junk in (b"\xff\xfe", b"[1, 2]", b"{not json"):
        (tmp_path / USAGE_FILE).write_bytes(junk)
        assert read_usage(tmp_path / USAGE_FILE) is None and shell_usage_after_kill(inf, tmp_path) == inf
