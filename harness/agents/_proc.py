"""Running one of a round's processes: its own session, a wall-time limit, output redacted line by line into
log files (and, for a CLI agent, read as it streams), its whole tree killed however it ends.

The caller wraps argv in the round's sandbox first (`task.box.wrap`). The tree is killed while its root is
still unreaped, so its group id cannot name anyone else yet and its descendants are still linked to it.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from harness.procs import kill_tree
from harness.secrets import redact

LineFn = Callable[[str], "str | None"]  # sees each stdout line; returns why to stop the process, or None


@dataclass
class ProcResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    stopped: str | None = None        # why `on_line` stopped it


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait until child `pid` exits, without reaping it; False on timeout."""
    end = time.monotonic() + timeout_s
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            if fd is not None:
                select.select([fd], [], [], min(left, 1.0))
            else:
                time.sleep(min(left, 0.05))
    finally:
        if fd is not None:
            os.close(fd)


def _pump(stream: IO[bytes], path: Path, on_line: LineFn | None, stop: Callable[[str], None]) -> None:
    with open(path, "w") as f:
        for raw in iter(stream.readline, b""):
            line = redact(raw.decode(errors="replace"))
            f.write(line)
            f.flush()
            if on_line is not None:
                why = on_line(line)
                if why:
                    stop(why)


def run_process(argv: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float, log_dir: Path,
                stdin_text: str | None = None, name: str = "agent", on_spawn: Callable[[int], None] = lambda pid: None,
                on_line: LineFn | None = None) -> ProcResult:
    """Run `argv` to completion, until `timeout_s`, or until `on_line` says stop; every end kills the group."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                            start_new_session=True)
    on_spawn(proc.pid)
    stopped: list[str] = []
    reaped = threading.Lock()  # held from the reap on: no kill may follow it

    def stop(why: str) -> None:
        if not stopped:
            stopped.append(why)
            if reaped.acquire(blocking=False):
                kill_tree(proc.pid)
                reaped.release()

    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out_path, on_line, stop), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err_path, None, stop), daemon=True)]
    for t in pumps:
        t.start()
    if stdin_text is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin_text), daemon=True).start()
    timed_out = False
    try:
        timed_out = not _wait_unreaped(proc.pid, timeout_s)
    finally:
        with reaped:
            kill_tree(proc.pid)
        reaped.acquire()
        proc.wait()
        for t in pumps:
            t.join(timeout=5)
    return ProcResult(None if timed_out or stopped else proc.returncode, out_path.read_text(errors="replace"),
                      err_path.read_text(errors="replace"), timed_out, time.monotonic() - t0,
                      stopped[0] if stopped else None)


def _feed(stdin: IO[bytes] | None, text: str) -> None:
    if stdin is None:
        return
    try:
        stdin.write(text.encode())
        stdin.close()
    except (BrokenPipeError, OSError):
        pass


def fill_placeholders(template: str, fields: dict[str, object], quote: bool = True) -> str:
    """`template` with `{name}` replaced for the names in `fields` only (shell-quoted); any other brace
    (`${VAR}`, JSON) is left alone, unlike str.format."""
    import re
    import shlex

    names = "|".join(re.escape(k) for k in fields)
    return re.sub(r"\{(" + names + r")\}",
                  lambda m: shlex.quote(str(fields[m.group(1)])) if quote else str(fields[m.group(1)]), template)
