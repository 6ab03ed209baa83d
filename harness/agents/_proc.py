"""Running an agent's subprocess: its own process group, a wall-time limit, output to log files."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class ProcResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float


def kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads (a child we started with start_new_session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_process(argv: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float, log_dir: Path,
                stdin_text: str | None = None, name: str = "agent",
                on_spawn: Callable[[int], None] = lambda pid: None) -> ProcResult:
    """Run `argv` to completion or until `timeout_s`; a timeout kills the whole group and is a result."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    t0 = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, text=True,
                                stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                                start_new_session=True)
        on_spawn(proc.pid)
        timed_out = False
        try:
            if stdin_text is not None:
                proc.communicate(stdin_text, timeout=timeout_s)
            else:
                proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid)
            proc.wait()
        else:
            kill_group(proc.pid)  # leave no stray grandchildren behind
    return ProcResult(None if timed_out else proc.returncode, out_path.read_text(errors="replace"),
                      err_path.read_text(errors="replace"), timed_out, time.monotonic() - t0)


def fill_placeholders(template: str, fields: dict[str, object], quote: bool = True) -> str:
    """`template` with `{name}` replaced for the names in `fields` only (shell-quoted); any other brace
    (`${VAR}`, JSON) is left alone, unlike str.format."""
    import re
    import shlex

    names = "|".join(re.escape(k) for k in fields)
    return re.sub(r"\{(" + names + r")\}",
                  lambda m: shlex.quote(str(fields[m.group(1)])) if quote else str(fields[m.group(1)]), template)
