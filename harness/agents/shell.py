"""`shell`: any command is the agent. It gets the prompt file and the worktree, as format fields and as
environment variables, and may report its usage in a JSON file ($FORGE_USAGE_FILE: tokens_in,
tokens_out, cost_usd)."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from harness.agents._proc import fill_placeholders, run_process
from harness.agents.base import AgentBackend, AgentResult, AgentTask


class ShellOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str  # format fields: {prompt_file} {worktree} {engine_dir} {stage} {round} {op}, shell-quoted


class ShellBackend(AgentBackend):
    name = "shell"
    Options = ShellOptions

    def run(self, task: AgentTask) -> AgentResult:
        usage_file = task.log_dir / "usage.json"
        fields = {"prompt_file": task.prompt_file, "worktree": task.worktree, "engine_dir": task.engine_dir,
                  "stage": task.stage, "round": task.round, "op": task.op or ""}
        cmd = fill_placeholders(self.options.command, fields)
        env = dict(task.env) | {f"FORGE_{k.upper()}": str(v) for k, v in fields.items()}
        env["FORGE_USAGE_FILE"] = str(usage_file)
        r = run_process(["bash", "-c", cmd], cwd=task.worktree, env=env, timeout_s=task.timeout_s,
                        log_dir=task.log_dir, name="shell", on_spawn=task.on_spawn)
        usage = {}
        if usage_file.is_file():
            try:
                usage = json.loads(usage_file.read_text())
            except json.JSONDecodeError:
                usage = {}
        error = "timeout" if r.timed_out else (f"exit {r.returncode}" if r.returncode else None)
        return AgentResult(summary=(r.stdout.strip().splitlines() or [""])[-1][:500], error=error,
                           tokens_in=usage.get("tokens_in"), tokens_out=usage.get("tokens_out"),
                           cost_usd=usage.get("cost_usd"))
