"""`shell`: any command is the agent, run in the round's sandbox. It gets the prompt file and the worktree,
as format fields and as environment variables, and may report its usage in a JSON file ($FORGE_USAGE_FILE:
tokens_in, tokens_out, cost_usd), in its outbox ($FORGE_OUT_DIR, the one place outside the worktree it may
write; kept, redacted, with the round's logs)."""

from __future__ import annotations

import json

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from harness.agents._proc import fill_placeholders, run_process
from harness.agents.base import AgentBackend, AgentFatal, AgentResult, AgentTask
from harness.ledger import Inflight

USAGE_FILE = "usage.json"  # in the agent's outbox ($FORGE_USAGE_FILE)


class ShellOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str  # format fields: {prompt_file} {worktree} {engine_dir} {stage} {round} {op}, shell-quoted


class ShellBackend(AgentBackend):
    name = "shell"
    Options = ShellOptions

    def run(self, task: AgentTask) -> AgentResult:
        usage_file = task.box.out_dir / USAGE_FILE
        fields = {"prompt_file": task.prompt_file, "worktree": task.worktree, "engine_dir": task.engine_dir,
                  "stage": task.stage, "round": task.round, "op": task.op or ""}
        cmd = fill_placeholders(self.options.command, fields)
        env = dict(task.env) | {f"FORGE_{k.upper()}": str(v) for k, v in fields.items()}
        env["FORGE_USAGE_FILE"] = str(usage_file)
        argv, env = task.box.wrap(["bash", "-c", cmd], env)
        try:
            r = run_process(argv, cwd=task.worktree, env=env, timeout_s=task.timeout_s, log_dir=task.log_dir,
                            name="shell", on_spawn=task.on_spawn)
        finally:  # an interrupted round still records what the agent reported
            _count(task, usage_file)
        if r.returncode == 127:  # bash: command not found; no round would do better
            raise AgentFatal(f"shell agent: command not found: {r.stderr.strip()[-300:]}")
        error = "timeout" if r.timed_out else (f"exit {r.returncode}" if r.returncode else None)
        return AgentResult(summary=(r.stdout.strip().splitlines() or [""])[-1][:500], error=error)


def read_usage(usage_file: Path) -> tuple[int, int, float | None] | None:
    """(tokens_in, tokens_out, cost_usd) from a shell agent's usage file; None when it wrote none (or garbage)."""
    try:
        usage = json.loads(usage_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(usage, dict):
        return None
    return int(usage.get("tokens_in") or 0), int(usage.get("tokens_out") or 0), usage.get("cost_usd")


def _count(task: AgentTask, usage_file: Path) -> None:
    usage = read_usage(usage_file)
    if usage is not None:
        task.meter.add(*usage)


def shell_usage_after_kill(inf: Inflight, outbox: Path) -> Inflight:
    """An interrupted shell round's usage: its agent's usage file, whether or not forge read it before a kill -9.
    A shell round's meter counts nothing but that file, so the in-flight record holds either none of it or all of
    it: the larger of the two is the round's, counted once."""
    usage = read_usage(outbox / USAGE_FILE)
    if usage is None:
        return inf
    tin, tout, cost = usage
    return inf.model_copy(update={"tokens_in": max(inf.tokens_in or 0, tin), "tokens_out": max(inf.tokens_out or 0, tout),
                                  "cost_usd": inf.cost_usd if cost is None else max(inf.cost_usd or 0.0, cost)})
