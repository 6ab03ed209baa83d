"""`codex`: Codex CLI in exec mode (`codex exec --json -`), the prompt on stdin, run in the worktree inside
the round's sandbox.

Its JSONL events carry usage in `turn.completed` (input, cached input, output tokens), counted as each
arrives (the run's budget stops it there), and failures in `turn.failed` / `error`; the CLI reports no
cost, so cost comes from the spec's prices when given. It gets the key in $OPENAI_API_KEY and
$CODEX_API_KEY when the harness holds one (`api_key_env`), else it logs in from its own state under HOME
(`home_state`, shown writable); it reaches only `network_allow`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from harness.agents._cli import find_cli, raise_if_fatal, run_cli
from harness.agents.base import AgentBackend, AgentResult, AgentTask, cost_from_prices


class CodexOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str = "codex"
    sandbox: str = "workspace-write"
    extra_args: list[str] = []
    price_in_per_mtok: float | None = None
    price_out_per_mtok: float | None = None
    api_key_env: str | None = "OPENAI_API_KEY"  # the harness's variable whose key the CLI gets; None: its login only
    home_state: list[str] = [".codex"]
    network_allow: list[str] = ["api.openai.com:443", "chatgpt.com:443"]


class CodexBackend(AgentBackend):
    name = "codex"
    Options = CodexOptions

    def run(self, task: AgentTask) -> AgentResult:
        o = self.options
        exe = find_cli(o.command, task)
        argv = [str(exe), "exec", "--json", "--skip-git-repo-check", "-C", str(task.worktree), "--sandbox", o.sandbox]
        if self.model:
            argv += ["--model", self.model]
        argv += [*o.extra_args, "-"]
        state: dict[str, Any] = {"message": "", "error": None, "turns": 0}

        def on_event(ev: dict[str, Any]) -> None:
            kind = ev.get("type", "")
            if kind == "turn.completed":
                state["turns"] += 1
                u = ev.get("usage") or {}
                tin, tout = int(u.get("input_tokens") or 0), int(u.get("output_tokens") or 0)  # cached is part of input
                task.meter.add(tin, tout, cost_from_prices(tin, tout, o.price_in_per_mtok, o.price_out_per_mtok))
            elif kind == "turn.failed":
                state["error"] = (ev.get("error") or {}).get("message", "turn failed")
            elif kind == "error":
                state["error"] = ev.get("message", "error")
            elif kind == "item.completed":
                item = ev.get("item") or {}
                if item.get("type") in ("agent_message", "assistant_message") and item.get("text"):
                    state["message"] = item["text"]

        r = run_cli(task, argv, name="codex", key_env=o.api_key_env, key_names=("OPENAI_API_KEY", "CODEX_API_KEY"),
                    home_state=o.home_state, network_allow=o.network_allow, on_event=on_event)
        error = "timeout" if r.timed_out else (state["error"] or (f"exit {r.returncode}" if r.returncode else None))
        if error and not r.timed_out:
            raise_if_fatal("codex", f"{error}\n{r.stderr[-500:]}")
        return AgentResult(summary=state["message"][:2000], error=error, turns=state["turns"])
