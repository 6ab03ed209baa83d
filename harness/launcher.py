"""The one way the harness starts a process: in a session of its own, with an optional wall-time limit, its output
captured (each line also handed to `on_line` as it arrives) or left on the terminal, and its whole tree killed
however it ends (exit, timeout, `on_line` asking to stop, an exception or a signal in the caller). A captured line
can be cleaned (secrets redacted) before anything keeps it, and written to a log file as it arrives.

The tree is killed while its root is still unreaped, so its group id cannot name anyone else yet and its
descendants are still linked to it (harness/procs.py: kill_tree). Ctrl-C reaches only the harness (the child is
in another session): with `forward_interrupt` it is passed on to the child's group and the child's own exit is
waited for (torchrun ends its ranks); otherwise the tree is killed and KeyboardInterrupt goes on up.
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from harness.procs import kill_tree

LineFn = Callable[[str], "str | None"]  # sees each stdout line as it arrives; returns why to stop the process, or None
CleanFn = Callable[[str], str]  # rewrites each captured line before it is kept, logged or seen (harness.secrets.redact)


@dataclass
class Finished:
    argv: list[str]
    returncode: int | None            # None: it was killed (timeout, or `on_line` stopped it)
    stdout: str                       # with merge_stderr: both streams, in order
    stderr: str
    timed_out: bool
    wall_s: float
    stopped: str | None = None        # why `on_line` stopped it

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> "Finished":
        """Itself when it exited 0; else LaunchFailed naming the command and its last error line."""
        if not self.ok:
            raise LaunchFailed(self)
        return self


class LaunchFailed(RuntimeError):
    def __init__(self, done: Finished) -> None:
        why = "timed out" if done.timed_out else f"exited {done.returncode}"
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        super().__init__(f"{' '.join(done.argv[:3])} {why}" + (f": {tail[0]}" if tail else ""))
        self.done = done


def wait_unreaped(pid: int, timeout_s: float | None) -> bool:
    """Wait until child `pid` exits, without reaping it; False on timeout."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            left = 1.0 if end is None else end - time.monotonic()
            if left <= 0:
                return False
            if fd is not None:
                select.select([fd], [], [], min(left, 1.0))
            else:
                time.sleep(min(left, 0.05))
    finally:
        if fd is not None:
            os.close(fd)


def _pump(stream: IO[str], into: list[str], on_line: LineFn | None, stop: Callable[[str], None],
          clean: CleanFn | None, log: Path | None) -> None:
    with open(log, "w") if log is not None else nullcontext() as f:
        for line in iter(stream.readline, ""):
            if clean is not None:
                line = clean(line)
            into.append(line)
            if f is not None:
                f.write(line)
                f.flush()  # a log that survives the harness's own death
            if on_line is not None:
                why = on_line(line)
                if why:
                    stop(why)


def _feed(stdin: IO[bytes] | None, text: str) -> None:
    if stdin is None:
        return
    try:
        stdin.write(text.encode())
        stdin.close()
    except (BrokenPipeError, OSError):
        pass


def run(argv: list[str], *, cwd: Path | str | None = None, env: dict[str, str] | None = None,
        timeout_s: float | None = None, capture: bool = True, merge_stderr: bool = False,
        stdin_text: str | None = None, on_line: LineFn | None = None,
        on_spawn: Callable[[int], None] = lambda pid: None, forward_interrupt: bool = False,
        clean: CleanFn | None = None, logs: tuple[Path, Path] | None = None, lf_only: bool = False) -> Finished:
    """Run `argv` to its end (or `timeout_s`, or until `on_line` says stop); every end kills its whole tree.
    `capture=False` leaves stdin, stdout and stderr on the caller's terminal. Captured output is read as UTF-8 (bad
    bytes replaced), each line passed through `clean` and, with `logs`, appended to (stdout file, stderr file) as
    it arrives. A line ends at \\n, \\r or \\r\\n (written \\n), or with `lf_only` at \\n only, its \\r kept.
    OSError if it cannot start."""
    t0 = time.monotonic()
    out_pipe = subprocess.PIPE if capture else None
    err_pipe = (subprocess.STDOUT if merge_stderr else subprocess.PIPE) if capture else None
    stdin = subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL if capture else None
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out_pipe, stderr=err_pipe, stdin=stdin,
                            start_new_session=True)
    on_spawn(proc.pid)
    newline = "\n" if lf_only else None
    streams = [None if s is None else io.TextIOWrapper(s, encoding="utf-8", errors="replace", newline=newline)
               for s in (proc.stdout, proc.stderr)]
    out: list[str] = []
    err: list[str] = []
    stopped: list[str] = []
    reaped = threading.Lock()  # held from the reap on: no kill may follow it

    def stop(why: str) -> None:
        if not stopped:
            stopped.append(why)
            if reaped.acquire(blocking=False):
                kill_tree(proc.pid)
                reaped.release()

    pumps = [threading.Thread(target=_pump, args=(s, into, fn, stop, clean, log), daemon=True)
             for s, into, fn, log in zip(streams, (out, err), (on_line, None), logs or (None, None)) if s is not None]
    timed_out = False
    try:  # from here on every way out, a Ctrl-C among them, ends the child's tree
        for t in pumps:
            t.start()
        if stdin_text is not None:
            threading.Thread(target=_feed, args=(proc.stdin, stdin_text), daemon=True).start()
        while True:
            try:
                timed_out = not wait_unreaped(proc.pid, None if timeout_s is None else timeout_s - (time.monotonic() - t0))
                break
            except KeyboardInterrupt:
                if not forward_interrupt:
                    raise
                try:
                    os.killpg(proc.pid, signal.SIGINT)  # the child's own shutdown (torchrun ends its ranks)
                except ProcessLookupError:
                    pass
    finally:
        with reaped:
            kill_tree(proc.pid)
        reaped.acquire()
        proc.wait()
        for t in pumps:
            if t.ident is not None:  # started
                t.join(timeout=5)
    return Finished(list(argv), None if timed_out or stopped else proc.returncode, "".join(out), "".join(err),
                    timed_out, time.monotonic() - t0, stopped[0] if stopped else None)
