"""`openai`: the OpenAI Chat Completions API (official SDK) with the built-in tool loop.

Chat Completions (not the Responses API): each turn sends the conversation with the four tools as
`function` tools; the model's `tool_calls` run in the worktree and go back as `role: tool` messages,
until a reply has no tool calls, `max_turns`, or the round's time is up. Works with any service that
speaks Chat Completions at `base_url`. Retries as in the anthropic backend.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from harness.agents import _tools
from harness.agents._api import ApiBackend, Transcript, api_key
from harness.agents._retry import call_with_retries
from harness.agents.base import AgentResult, AgentTask, cost_from_prices

if importlib.util.find_spec("openai") is None:  # registered only where the SDK is installed
    raise ImportError("the openai backend needs the `openai` package")


class OpenAIBackend(ApiBackend):
    name = "openai"
    def run(self, task: AgentTask) -> AgentResult:
        import openai  # imported here: the SDK costs seconds to import, and most runs never use it

        o = self.options
        client = openai.OpenAI(api_key=api_key(o, "OPENAI_API_KEY"), base_url=o.base_url, max_retries=0,
                               timeout=o.request_timeout_s)
        tools = [{"type": "function", "function": t} for t in _tools.TOOLS]
        messages: list[dict[str, Any]] = [{"role": "system", "content": o.system},
                                          {"role": "user", "content": task.prompt}]
        log = Transcript(task.log_dir)
        deadline = time.monotonic() + task.timeout_s
        tokens_in = tokens_out = turns = 0
        summary, error = "", None
        while True:
            if turns >= o.max_turns:
                error = f"max_turns ({o.max_turns}) reached"
                break
            if time.monotonic() > deadline:
                error = "timeout"
                break
            resp = call_with_retries(
                lambda: client.chat.completions.create(model=self.model, messages=messages, tools=tools,
                                                       max_completion_tokens=o.max_tokens),
                retries=o.retries, base_s=o.retry_base_s,
                on_retry=lambda n, e, s: log.write("retry", attempt=n, error=type(e).__name__, wait_s=round(s, 2)))
            turns += 1
            if resp.usage is not None:
                tokens_in += resp.usage.prompt_tokens or 0
                tokens_out += resp.usage.completion_tokens or 0
            msg = resp.choices[0].message
            calls = list(msg.tool_calls or [])
            entry: dict[str, Any] = {"role": "assistant", "content": msg.content or ""}
            if calls:
                entry["tool_calls"] = [{"id": c.id, "type": "function",
                                        "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                       for c in calls]
            log.write("assistant", finish_reason=resp.choices[0].finish_reason, message=entry)
            messages.append(entry)
            summary = msg.content or summary
            if not calls:
                break
            for c in calls:
                out = _tools.execute(c.function.name, _tools.parse_args(c.function.arguments), root=task.worktree,
                                     env=task.env,
                                     max_timeout_s=min(o.command_timeout_s, max(1.0, deadline - time.monotonic())))
                log.write("tool", name=c.function.name, arguments=c.function.arguments, output=out[:2000])
                messages.append({"role": "tool", "tool_call_id": c.id, "content": out})
        return AgentResult(summary=summary[:2000], error=error, tokens_in=tokens_in, tokens_out=tokens_out, turns=turns,
                           cost_usd=cost_from_prices(tokens_in, tokens_out, o.price_in_per_mtok, o.price_out_per_mtok))
