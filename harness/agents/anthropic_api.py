"""`anthropic`: the Anthropic Messages API (official SDK) in the shared tool loop (harness/agents/_api.py).

The model's `tool_use` blocks run in the worktree and go back as `tool_result` blocks; a reply whose
`stop_reason` is not "tool_use" ends the round.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from harness.agents import _tools
from harness.agents._api import ApiBackend, Reply, ToolCall, Transcript, malformed
from harness.agents.base import AgentTask

if importlib.util.find_spec("anthropic") is None:  # registered only where the SDK is installed
    raise ImportError("the anthropic backend needs the `anthropic` package")

TOOLS = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]} for t in _tools.TOOLS]


def _block_to_param(block: Any) -> dict[str, Any]:
    if block.type == "text":
        return {"type": "text", "text": block.text}
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    return block.model_dump(exclude_none=True)


class AnthropicBackend(ApiBackend):
    name = "anthropic"
    key_env = "ANTHROPIC_API_KEY"

    def _client(self, key: str) -> Any:
        import anthropic  # imported here: the SDK costs seconds to import, and most runs never use it

        return anthropic.Anthropic(api_key=key, base_url=self.options.base_url, max_retries=0,
                                   timeout=self.options.request_timeout_s)

    def _messages(self, task: AgentTask) -> list[dict[str, Any]]:
        return [{"role": "user", "content": task.prompt}]  # the system prompt is a request field here

    def _send(self, client: Any, messages: list[dict[str, Any]], log: Transcript, timeout_s: float) -> Reply:
        o = self.options
        try:
            resp = client.messages.create(model=self.model, max_tokens=o.max_tokens, system=o.system,
                                          messages=messages, tools=TOOLS, timeout=timeout_s)
            content = [_block_to_param(b) for b in resp.content]
            calls = [ToolCall(b["id"], b["name"], b["input"]) for b in content if b["type"] == "tool_use"]
            reply = Reply(text="\n".join(b["text"] for b in content if b["type"] == "text"),
                          calls=calls if resp.stop_reason == "tool_use" else [],
                          tokens_in=resp.usage.input_tokens or 0, tokens_out=resp.usage.output_tokens or 0)
        except (ValueError, AttributeError, TypeError, KeyError) as e:  # a 200 whose body is not a Message
            raise malformed(e) from e
        log.write("assistant", stop_reason=resp.stop_reason, content=content)
        messages.append({"role": "assistant", "content": content})
        return reply

    def _add_results(self, messages: list[dict[str, Any]], results: list[tuple[ToolCall, str]]) -> None:
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": c.id, "content": out}
                                                     for c, out in results]})
