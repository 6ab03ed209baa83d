"""`anthropic`: the Anthropic Messages API (official SDK) with the built-in tool loop.

Each turn sends the conversation with the four tools (harness/agents/_tools.py); the model's
`tool_use` blocks run in the worktree and go back as `tool_result` blocks, until it stops asking
(`stop_reason != "tool_use"`), `max_turns`, or the round's time is up. The SDK's own retries are off:
harness/agents/_retry.py retries 429 / 5xx / timeouts with backoff, visibly.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from harness.agents import _tools
from harness.agents._api import ApiBackend, Transcript, api_key
from harness.agents._retry import call_with_retries
from harness.agents.base import AgentResult, AgentTask, cost_from_prices

if importlib.util.find_spec("anthropic") is None:  # registered only where the SDK is installed
    raise ImportError("the anthropic backend needs the `anthropic` package")


def _block_to_param(block: Any) -> dict[str, Any]:
    if block.type == "text":
        return {"type": "text", "text": block.text}
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    return block.model_dump(exclude_none=True)


class AnthropicBackend(ApiBackend):
    name = "anthropic"
    def run(self, task: AgentTask) -> AgentResult:
        import anthropic  # imported here: the SDK costs seconds to import, and most runs never use it

        o = self.options
        client = anthropic.Anthropic(api_key=api_key(o, "ANTHROPIC_API_KEY"), base_url=o.base_url, max_retries=0,
                                     timeout=o.request_timeout_s)
        tools = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                 for t in _tools.TOOLS]
        messages: list[dict[str, Any]] = [{"role": "user", "content": task.prompt}]
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
                lambda: client.messages.create(model=self.model, max_tokens=o.max_tokens,
                                               system=o.system, messages=messages, tools=tools),
                retries=o.retries, base_s=o.retry_base_s,
                on_retry=lambda n, e, s: log.write("retry", attempt=n, error=type(e).__name__, wait_s=round(s, 2)))
            turns += 1
            tokens_in += resp.usage.input_tokens or 0
            tokens_out += resp.usage.output_tokens or 0
            content = [_block_to_param(b) for b in resp.content]
            log.write("assistant", stop_reason=resp.stop_reason, content=content)
            messages.append({"role": "assistant", "content": content})
            summary = "\n".join(b["text"] for b in content if b["type"] == "text") or summary
            calls = [b for b in content if b["type"] == "tool_use"]
            if resp.stop_reason != "tool_use" or not calls:
                break
            results = []
            for c in calls:
                out = _tools.execute(c["name"], _tools.parse_args(c["input"]), root=task.worktree, env=task.env,
                                     max_timeout_s=min(o.command_timeout_s, max(1.0, deadline - time.monotonic())))
                log.write("tool", name=c["name"], input=c["input"], output=out[:2000])
                results.append({"type": "tool_result", "tool_use_id": c["id"], "content": out})
            messages.append({"role": "user", "content": results})
        return AgentResult(summary=summary[:2000], error=error, tokens_in=tokens_in, tokens_out=tokens_out, turns=turns,
                           cost_usd=cost_from_prices(tokens_in, tokens_out, o.price_in_per_mtok, o.price_out_per_mtok))
