"""What the CLI agents (claude_code, codex) share: finding the CLI, its key and login state, its network
(only its service, through harness/egress.py), and reading its JSON event stream as it arrives, so usage
is counted per event and the CLI is stopped at the run's budget."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from harness.agents._proc import run_process
from harness.agents.base import FATAL_TEXT, AgentFatal, AgentTask, BudgetSpent
from harness.egress import EgressProxy
from harness.launcher import Finished
from harness.secrets import VAULT, redact


def find_cli(command: str, task: AgentTask) -> Path:
    """The CLI on the agent's PATH; a missing one stops the run (no round would do better)."""
    exe = shutil.which(command, path=task.env.get("PATH"))
    if exe is None:
        raise AgentFatal(f"{command!r} not found on the agent's PATH ({task.env.get('PATH', '')}): install it, "
                         "or set agent.options.command")
    return Path(exe)


def run_cli(task: AgentTask, argv: list[str], *, name: str, key_env: str | None, key_names: tuple[str, ...],
            home_state: list[str], network_allow: list[str], on_event: Callable[[dict[str, Any]], None]) -> Finished:
    """Run a CLI agent in the round's sandbox with its own key (and no other), its login state under HOME,
    and egress to `network_allow` only; `on_event` sees each JSON line of its stdout."""
    env = dict(task.env)
    key = VAULT.get(key_env) if key_env else None
    if key:
        env |= {n: key for n in key_names}
    home = Path(env.get("HOME") or Path.home())
    writable = tuple(home / p for p in home_state if (home / p).exists())
    read_only = (Path(argv[0]).resolve().parent,)

    def on_line(line: str) -> str | None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return None
        if isinstance(event, dict):
            on_event(event)
        return task.meter.spent()

    with EgressProxy(network_allow, log=task.log_dir / "egress.log") if task.box.sandboxed else nullcontext() as proxy:
        wrapped, env = task.box.wrap(argv, env, writable=writable, read_only=read_only,
                                     egress_dir=proxy.dir if proxy is not None else None)
        r = run_process(wrapped, cwd=task.worktree, env=env, timeout_s=task.timeout_s, log_dir=task.log_dir,
                        stdin_text=task.prompt, name=name, on_spawn=task.on_spawn, on_line=on_line)
    if r.stopped:
        raise BudgetSpent(f"{r.stopped}; {name} was stopped")
    return r


def raise_if_fatal(name: str, text: str) -> None:
    """A CLI failure no retry can fix (its key or login, its model) stops the run."""
    if FATAL_TEXT.search(text):
        raise AgentFatal(f"{name} cannot work: {redact(text.strip())[:300]}")
