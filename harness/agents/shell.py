"""`shell`: any command is the agent, run in the round's sandbox. It gets the prompt file and the worktree,
as format fields and as environment variables, and may report its usage in a JSON file ($FORGE_USAGE_FILE:
tokens_in, tokens_out, cost_usd), in its outbox ($FORGE_OUT_DIR, the one place outside the worktree it may
write; kept, redacted, with the round's logs)."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from harness.agents._proc import fill_placeholders, run_process
from harness.agents.base import AgentBackend, AgentFatal, AgentResult, AgentTask


class ShellOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str  # format fields: {prompt_file} {worktree} {engine_dir} {stage} {round} {op}, shell-quoted


class ShellBackend(AgentBackend):
    name = "shell"
    Options = ShellOptions

    def run(self, task: AgentTask) -> AgentResult:
        usage_file = task.box.out_dir / "usage.json"
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


def _count(task: AgentTask, usage_file) -> None:
    try:
        usage = json.loads(usage_file.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if isinstance(usage, dict):
        task.meter.add(usage.get("tokens_in") or 0, usage.get("tokens_out") or 0, usage.get("cost_usd"))
