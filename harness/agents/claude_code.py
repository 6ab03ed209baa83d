"""`claude_code`: Claude Code headless (`claude -p --output-format json`), the prompt on stdin, run in the
worktree. Its single JSON result gives the answer, `usage` (tokens) and `total_cost_usd`.

Claude Code authenticates from its own login state under $HOME (keep HOME in [agent].env_allow); the
harness never hands it an API key.
"""

from __future__ import annotations

import json
import shutil

from pydantic import BaseModel, ConfigDict

from harness.agents._proc import run_process
from harness.agents.base import AgentBackend, AgentResult, AgentTask


class ClaudeCodeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str = "claude"
    permission_mode: str = "bypassPermissions"
    max_turns: int | None = None
    allowed_tools: list[str] | None = None
    extra_args: list[str] = []


def parse_result(stdout: str) -> dict:
    """The last JSON object on stdout (the CLI prints one; stream-json prints the result last)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        return {}


class ClaudeCodeBackend(AgentBackend):
    name = "claude_code"
    Options = ClaudeCodeOptions

    def run(self, task: AgentTask) -> AgentResult:
        o = self.options
        exe = shutil.which(o.command, path=task.env.get("PATH"))
        if exe is None:
            return AgentResult(error=f"{o.command!r} not found on the agent's PATH")
        argv = [exe, "-p", "--output-format", "json", "--permission-mode", o.permission_mode]
        if self.model:
            argv += ["--model", self.model]
        if o.max_turns:
            argv += ["--max-turns", str(o.max_turns)]
        if o.allowed_tools:
            argv += ["--allowedTools", ",".join(o.allowed_tools)]
        argv += o.extra_args
        r = run_process(argv, cwd=task.worktree, env=task.env, timeout_s=task.timeout_s, log_dir=task.log_dir,
                        stdin_text=task.prompt, name="claude", on_spawn=task.on_spawn)
        out = parse_result(r.stdout)
        usage = out.get("usage") or {}
        tokens_in = sum(int(usage.get(k) or 0) for k in
                        ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")) if usage else None
        error = None
        if r.timed_out:
            error = "timeout"
        elif r.returncode or out.get("is_error"):
            error = f"exit {r.returncode}: {out.get('subtype') or r.stderr.strip()[-200:]}"
        cost = out.get("total_cost_usd", out.get("cost_usd"))
        return AgentResult(summary=str(out.get("result") or "")[:2000], error=error, tokens_in=tokens_in,
                           tokens_out=usage.get("output_tokens"), cost_usd=cost, turns=out.get("num_turns"))
