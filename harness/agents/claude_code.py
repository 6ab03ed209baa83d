"""`claude_code`: Claude Code headless (`claude -p --output-format stream-json --verbose`), the prompt on
stdin, run in the worktree inside the round's sandbox. Each assistant message's usage is counted as it
streams (the run's budget stops it there); the final `result` event gives the answer, the totals and
`total_cost_usd`, which replace the streamed counts.

It gets the key in $ANTHROPIC_API_KEY when the harness holds one (`api_key_env`), else it logs in from its
own state under HOME (`home_state`, shown writable); it reaches only `network_allow`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from harness.agents._cli import find_cli, raise_if_fatal, run_cli
from harness.agents.base import AgentBackend, AgentResult, AgentTask, cost_from_prices


class ClaudeCodeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str = "claude"
    permission_mode: str = "bypassPermissions"
    max_turns: int | None = None
    allowed_tools: list[str] | None = None
    extra_args: list[str] = []
    api_key_env: str | None = "ANTHROPIC_API_KEY"  # the harness's variable whose key the CLI gets; None: its login only
    home_state: list[str] = [".claude", ".claude.json", ".config/claude"]
    network_allow: list[str] = ["api.anthropic.com:443"]
    price_in_per_mtok: float | None = None   # estimates cost while it streams (its own total replaces it)
    price_out_per_mtok: float | None = None


def usage_tokens(usage: dict[str, Any]) -> tuple[int, int]:
    """(input incl. cache writes and reads, output) of a Messages API usage block."""
    tin = sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    return tin, int(usage.get("output_tokens") or 0)


class ClaudeCodeBackend(AgentBackend):
    name = "claude_code"
    Options = ClaudeCodeOptions

    def run(self, task: AgentTask) -> AgentResult:
        o = self.options
        exe = find_cli(o.command, task)
        argv = [str(exe), "-p", "--output-format", "stream-json", "--verbose", "--permission-mode", o.permission_mode]
        if self.model:
            argv += ["--model", self.model]
        if o.max_turns:
            argv += ["--max-turns", str(o.max_turns)]
        if o.allowed_tools:
            argv += ["--allowedTools", ",".join(o.allowed_tools)]
        argv += o.extra_args
        seen: dict[str, tuple[int, int]] = {}  # message id -> usage counted (a message streams in several lines)
        final: dict[str, Any] = {}

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("type") == "result":
                final.clear()
                final.update(ev)
                return
            msg = ev.get("message") if ev.get("type") == "assistant" else None
            if not isinstance(msg, dict) or not isinstance(msg.get("usage"), dict):
                return
            tin, tout = usage_tokens(msg["usage"])
            key = str(msg.get("id") or len(seen))
            pin, pout = seen.get(key, (0, 0))
            din, dout = max(0, tin - pin), max(0, tout - pout)
            seen[key] = (max(tin, pin), max(tout, pout))
            task.meter.add(din, dout, cost_from_prices(din, dout, o.price_in_per_mtok, o.price_out_per_mtok))

        r = run_cli(task, argv, name="claude", key_env=o.api_key_env, key_names=("ANTHROPIC_API_KEY",),
                    home_state=o.home_state, network_allow=o.network_allow, on_event=on_event)
        if final.get("usage") or final.get("total_cost_usd") is not None:
            tin, tout = usage_tokens(final.get("usage") or {})
            task.meter.settle(tin if final.get("usage") else None, tout if final.get("usage") else None,
                              final.get("total_cost_usd", final.get("cost_usd")))
        error = None
        if r.timed_out:
            error = "timeout"
        elif r.returncode or final.get("is_error") or not final:
            detail = str(final.get("result") or final.get("subtype") or r.stderr.strip()[-300:] or "no result event")
            raise_if_fatal("claude_code", detail + "\n" + r.stderr[-500:])
            error = f"exit {r.returncode}: {detail[:300]}"
        return AgentResult(summary=str(final.get("result") or "")[:2000], error=error, turns=final.get("num_turns"))
