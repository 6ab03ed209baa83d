"""Running one of a round's processes through harness/launcher.py: its own session, a wall-time limit, output
redacted line by line into log files (and, for a CLI agent, read as it streams), its whole tree killed however it
ends. The caller wraps argv in the round's sandbox first (`task.box.wrap`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness import launcher
from harness.launcher import Finished, LineFn
from harness.secrets import redact


def run_process(argv: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float, log_dir: Path,
                stdin_text: str | None = None, name: str = "agent", on_spawn: Callable[[int], None] = lambda pid: None,
                on_line: LineFn | None = None) -> Finished:
    """Run `argv` to completion, until `timeout_s`, or until `on_line` (which sees redacted stdout lines) says stop;
    every end kills the whole tree. Its output goes to `log_dir/<name>.stdout` and `.stderr` as it arrives;
    the result's stdout and stderr are those logs' text."""
    log_dir.mkdir(parents=True, exist_ok=True)
    # lf_only: an agent's log keeps its bytes (a progress bar's \r stays inside its line)
    return launcher.run(argv, cwd=cwd, env=env, timeout_s=timeout_s, stdin_text=stdin_text, on_line=on_line,
                        on_spawn=on_spawn, clean=redact, logs=(log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"),
                        lf_only=True)


def fill_placeholders(template: str, fields: dict[str, object], quote: bool = True) -> str:
    """`template` with `{name}` replaced for the names in `fields` only (shell-quoted); any other brace
    (`${VAR}`, JSON) is left alone, unlike str.format."""
    import re
    import shlex

    names = "|".join(re.escape(k) for k in fields)
    return re.sub(r"\{(" + names + r")\}",
                  lambda m: shlex.quote(str(fields[m.group(1)])) if quote else str(fields[m.group(1)]), template)
