"""`train`'s console: the ranks' output streamed and kept in a log file; on a failure, the failing rank's own
one-line error printed last, where torchrun would leave its 40-line launcher traceback."""

from __future__ import annotations

import re
import sys
from collections import deque
from pathlib import Path
from typing import TextIO

from harness import launcher

ENGINE_ERROR = re.compile(r"^(?:\[rank(\d+)\]:\s*)?((?:error|unsupported)(?: \(rank (\d+)\))?: .+)$")  # engines' _guard
EXCEPTION = re.compile(r"^(?:\[rank(\d+)\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*)$")
TORCHRUN_FAILED = re.compile(r"failed \(exitcode: -?\d+\) local_rank: \d+")  # torchrun's E-line: its report follows
ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
RANK_PREFIX = re.compile(r"^\[rank\d+\]: ?")
USAGE_BOX = re.compile(r"^(?:\[rank\d+\]:\s*)?╭─ Error ─")  # click/typer's usage error, as a rich panel
BOX_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?│\s*(.*?)\s*│\s*$")
PLAIN_USAGE = re.compile(r"^(?:\[rank\d+\]:\s*)?Error: (.+)$")  # the same without rich
DETAIL_LINES = 4  # at most this many indented detail lines joined to an error line that ends with ':'


def _with_detail(text: str, after: list[str]) -> str:
    """An error line that ends with ':' (e.g. 'invalid engine config:') with its indented detail lines joined on,
    so the one line says what was wrong."""
    if not text.endswith(":"):
        return text
    details = []
    for line in after[:DETAIL_LINES]:
        line = RANK_PREFIX.sub("", line)
        if not line[:1].isspace() or not line.strip():
            break
        details.append(line.strip())
    return f"{text} {'; '.join(details)}" if details else text


def _usage_error(lines: list[str]) -> str | None:
    """A rank's command-line usage error (an unknown option, a bad value), as click/typer print it."""
    for i, line in enumerate(lines):
        if USAGE_BOX.match(line):
            text = []
            for inner in lines[i + 1:i + 6]:
                m = BOX_LINE.match(inner)
                if not m:
                    break
                text.append(m.group(1))
            if any(text):
                return "usage error: " + " ".join(t for t in text if t)
        m = PLAIN_USAGE.match(line)
        if m:
            return "usage error: " + m.group(1)
    return None


def root_cause_rank(lines: list[str]) -> int | None:
    """The rank torchrun's failure report names as the root cause (the first rank that failed)."""
    for i, line in enumerate(lines):
        if line.startswith("Root Cause"):
            for after in lines[i + 1:i + 8]:
                m = ROOT_RANK.match(after)
                if m:
                    return int(m.group(1))
    return None


def failing_rank_line(lines: list[str]) -> str | None:
    """The failing rank's one-line error: the engine's `error (rank N): ...` of the root-cause rank (with its
    indented detail lines when it ends with ':'), else any such line, else a rank's command-line usage error,
    else the last exception line a rank printed (torchrun's own ChildFailedError excluded)."""
    rank = root_cause_rank(lines)
    engine = [(m.group(1) or m.group(3), _with_detail(m.group(2), lines[i + 1:]))
              for i, m in enumerate(map(ENGINE_ERROR.match, lines)) if m]
    for r, text in engine:
        if rank is not None and r is not None and int(r) == rank:
            return text
    if engine:
        return engine[-1][1]
    launcher = next((i for i, line in enumerate(lines) if TORCHRUN_FAILED.search(line)), len(lines))
    usage = _usage_error(lines[:launcher])
    if usage:
        return usage
    found = [m.group(2) for m in map(EXCEPTION.match, lines[:launcher]) if m and "ChildFailedError" not in m.group(2)]
    return found[-1] if found else None


def run_logged(cmd: list[str], env: dict[str, str], log: Path, out: TextIO | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, streaming its output to `out` and all of it to `log`; torchrun's failure report goes to the log
    only. Returns (exit code, the last lines). Ctrl-C is passed on to torchrun, and its ranks' ending awaited."""
    out = out or sys.stdout  # looked up per call: tests swap it
    log.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=2000)
    hidden = [0]
    with log.open("w") as fh:
        def line(text: str) -> None:
            fh.write(text)
            tail.append(text.rstrip("\n"))
            if hidden[0] or TORCHRUN_FAILED.search(text):
                hidden[0] += 1
                return
            out.write(text)
            out.flush()

        done = launcher.run(cmd, env=env, merge_stderr=True, on_line=line, forward_interrupt=True)
    if hidden[0]:
        out.write(f"(torchrun's failure report, {hidden[0]} lines: in {log})\n")
        out.flush()
    return (done.returncode if done.returncode is not None else 1), list(tail)
