"""The gate's clock on a running `pretrain`: each step's JSONL log line stamped when it first appears.

A step's line carries its loss, which the gate later checks against the reference's, so the line cannot appear
before the step's work is done: its arrival, read on the gate's own monotonic clock, is the latest time the
step can have finished. M5's speed part times the steps between two such arrivals within one run, so the run's
one-time costs (start-up, compile, capture, the final save, exit) fall outside the window instead of being
assumed to cancel between two runs: on an H200 they differ by 5-11 s from one run of `pretrain` to the next
(benchmarks/results/engine-startup-2026-12-04-h200/).

What the window trusts: that line `first` is not held back. An engine that held lines and released them in a
burst would shorten the window. `line_window` never takes a window shorter than the timed steps x the median gap
between consecutive lines, so a backlog released at once gains nothing unless it is held for more than half of the
timed steps. A backlog released at a fake pace is the remaining way to shorten it. The training contract forbids holding
lines (gates/train_contract.py), and M5 also records the whole run's tokens / wall, a figure no engine can inflate.
Feeding the batches from the gate as the run consumes them would remove the trust; the contract's token-batches file
does not allow that yet.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from types import TracebackType

POLL_S = 0.002  # a 0.2 s step is stamped to 1 %; a read of the log's new bytes costs microseconds


class LineClock:
    """Stamps the first appearance of each step's line in `path` (the run's --log-file) on `time.monotonic()`,
    from a thread polling the file while the `with` block runs. Lines already in the file when it starts are
    not stamped (a resumed run appends)."""

    def __init__(self, path: Path, poll_s: float = POLL_S):
        self.path, self.poll_s = path, poll_s
        self.stamps: dict[int, float] = {}  # step -> when its first line appeared
        self._offset = path.stat().st_size if path.is_file() else 0
        self._partial = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="line-clock", daemon=True)

    def __enter__(self) -> LineClock:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._read()  # lines written in the last poll interval: stamped now, at the latest

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(self.poll_s)

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                new = f.read()
        except FileNotFoundError:
            return
        if not new:
            return
        now = time.monotonic()
        self._offset += len(new)
        data = self._partial + new
        whole, _, self._partial = data.rpartition(b"\n")
        for line in whole.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # not a step's line (the contract's reader decides what that means)
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, int) and not isinstance(step, bool) and step not in self.stamps:
                self.stamps[step] = now


def line_window(stamps: dict[int, float], first: int, last: int) -> tuple[float | None, dict]:
    """The time steps first+1..last took on the gate's clock: the arrival of line `last` minus that of line
    `first`, but never less than (last - first) x the median gap between consecutive lines of those steps.
    Returns (seconds or None where a line was never seen, the numbers behind it)."""
    missing = [s for s in range(first, last + 1) if s not in stamps]
    if missing:
        return None, {"lines_missing": f"{len(missing)} of steps {first}..{last}, first {missing[0]}"}
    span = stamps[last] - stamps[first]
    gaps = [stamps[s] - stamps[s - 1] for s in range(first + 1, last + 1)]
    median = statistics.median(gaps)
    steps = last - first
    return max(span, steps * median), {"lines_span_s": round(span, 4), "line_gap_median_s": round(median, 5),
                                       "line_gap_max_s": round(max(gaps), 4), "lines_out_of_order": sum(g < 0 for g in gaps)}
