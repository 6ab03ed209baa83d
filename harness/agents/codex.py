"""`codex`: Codex CLI in exec mode (`codex exec --json -`), the prompt on stdin, run in the worktree.

Its JSONL events carry usage in `turn.completed` (input, cached input, output tokens) and failures in
`turn.failed` / `error`; the CLI reports no cost, so cost comes from the spec's prices when given.
Codex authenticates from its own login state under $HOME; the harness never hands it an API key.
"""

from __future__ import annotations

import json
import shutil

from pydantic import BaseModel, ConfigDict

from harness.agents._proc import run_process
from harness.agents.base import AgentBackend, AgentResult, AgentTask, cost_from_prices


class CodexOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str = "codex"
    sandbox: str = "workspace-write"
    extra_args: list[str] = []
    price_in_per_mtok: float | None = None
    price_out_per_mtok: float | None = None


def summarize_events(stdout: str) -> dict:
    """Sum usage over turns; collect the last agent message and any error."""
    tokens_in = tokens_out = 0
    seen_usage, message, error, turns = False, "", None, 0
    for line in stdout.splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = ev.get("type", "")
        if kind == "turn.completed":
            turns += 1
            u = ev.get("usage") or {}
            seen_usage = True
            tokens_in += int(u.get("input_tokens") or 0)  # cached input is a subset of input_tokens
            tokens_out += int(u.get("output_tokens") or 0)
        elif kind == "turn.failed":
            error = (ev.get("error") or {}).get("message", "turn failed")
        elif kind == "error":
            error = ev.get("message", "error")
        elif kind == "item.completed":
            item = ev.get("item") or {}
            if item.get("type") in ("agent_message", "assistant_message") and item.get("text"):
                message = item["text"]
    return {"tokens_in": tokens_in if seen_usage else None, "tokens_out": tokens_out if seen_usage else None,
            "message": message, "error": error, "turns": turns}


class CodexBackend(AgentBackend):
    name = "codex"
    Options = CodexOptions

    def run(self, task: AgentTask) -> AgentResult:
        o = self.options
        exe = shutil.which(o.command, path=task.env.get("PATH"))
        if exe is None:
            return AgentResult(error=f"{o.command!r} not found on the agent's PATH")
        argv = [exe, "exec", "--json", "--skip-git-repo-check", "-C", str(task.worktree), "--sandbox", o.sandbox]
        if self.model:
            argv += ["--model", self.model]
        argv += [*o.extra_args, "-"]
        r = run_process(argv, cwd=task.worktree, env=task.env, timeout_s=task.timeout_s, log_dir=task.log_dir,
                        stdin_text=task.prompt, name="codex", on_spawn=task.on_spawn)
        s = summarize_events(r.stdout)
        error = "timeout" if r.timed_out else (s["error"] or (f"exit {r.returncode}" if r.returncode else None))
        return AgentResult(summary=s["message"][:2000], error=error, tokens_in=s["tokens_in"], tokens_out=s["tokens_out"],
                           cost_usd=cost_from_prices(s["tokens_in"], s["tokens_out"], o.price_in_per_mtok,
                                                     o.price_out_per_mtok), turns=s["turns"])
