"""`openai`: the OpenAI Chat Completions API (official SDK) in the shared tool loop (harness/agents/_api.py).

Chat Completions (not the Responses API): the tools go as `function` tools, the model's `tool_calls` run
in the worktree and go back as `role: tool` messages; a reply without tool calls ends the round. Works
with any service that speaks Chat Completions at `base_url`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from harness.agents import _tools
from harness.agents._api import ApiBackend, Reply, ToolCall, Transcript, malformed
from harness.agents.base import AgentTask

if importlib.util.find_spec("openai") is None:  # registered only where the SDK is installed
    raise ImportError("the openai backend needs the `openai` package")

TOOLS = [{"type": "function", "function": t} for t in _tools.TOOLS]


class OpenAIBackend(ApiBackend):
    name = "openai"
    key_env = "OPENAI_API_KEY"

    def _client(self, key: str) -> Any:
        import openai  # imported here: the SDK costs seconds to import, and most runs never use it

        return openai.OpenAI(api_key=key, base_url=self.options.base_url, max_retries=0,
                             timeout=self.options.request_timeout_s)

    def _messages(self, task: AgentTask) -> list[dict[str, Any]]:
        return [{"role": "system", "content": self.options.system}, {"role": "user", "content": task.prompt}]

    def _send(self, client: Any, messages: list[dict[str, Any]], log: Transcript, timeout_s: float) -> Reply:
        try:
            resp = client.chat.completions.create(model=self.model, messages=messages, tools=TOOLS,
                                                  max_completion_tokens=self.options.max_tokens, timeout=timeout_s)
            msg = resp.choices[0].message
            calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls or []]
            usage = resp.usage
            reply = Reply(text=msg.content or "", calls=calls, tokens_in=(usage.prompt_tokens or 0) if usage else 0,
                          tokens_out=(usage.completion_tokens or 0) if usage else 0)
            finish = resp.choices[0].finish_reason
        except (ValueError, AttributeError, TypeError, KeyError, IndexError) as e:  # a 200 that is no completion
            raise malformed(e) from e
        entry: dict[str, Any] = {"role": "assistant", "content": msg.content or ""}
        if calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                   for c in calls]
        log.write("assistant", finish_reason=finish, message=entry)
        messages.append(entry)
        return reply

    def _add_results(self, messages: list[dict[str, Any]], results: list[tuple[ToolCall, str]]) -> None:
        messages.extend({"role": "tool", "tool_call_id": c.id, "content": out} for c, out in results)
