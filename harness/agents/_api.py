"""What the two API backends (anthropic, openai) share: options, the key lookup, the transcript, and the
tool loop itself. A provider supplies only its wire format (`ApiBackend`'s four hooks).

The key comes from harness.secrets.VAULT and goes only into the SDK client, in this process: no child
ever gets it. Each reply's usage is counted on the round's meter as it arrives; the budget is checked
before every call."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from harness.agents import _tools
from harness.agents._retry import DeadlineReached, MalformedReply, call_with_retries
from harness.agents.base import AgentBackend, AgentFatal, AgentResult, AgentTask, cost_from_prices
from harness.secrets import VAULT, redact

SYSTEM = ("You are a coding agent working in a git worktree of an LLM pretraining engine. Use the tools to "
          "read, write and run; paths are relative to the worktree root. Finish with a short summary of "
          "what you changed.")


class ApiOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_url: str | None = Field(None, description="the service's URL (a local server in tests)")
    api_key_env: str | None = Field(None, description="environment variable holding the key (default per service)")
    max_tokens: int = Field(8192, gt=0)
    max_turns: int = Field(60, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    command_timeout_s: float = Field(900.0, gt=0, description="cap of one run_command tool call")
    retries: int = Field(6, ge=0)
    retry_base_s: float = Field(2.0, ge=0)
    price_in_per_mtok: float | None = None
    price_out_per_mtok: float | None = None
    system: str = SYSTEM


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: Any  # as the service sent them: a dict (anthropic) or a JSON string (openai)


@dataclass
class Reply:
    """One model turn, provider-neutral."""

    text: str  # "" when the reply has no text
    calls: list[ToolCall]  # the tools it asks for; none ends the round
    tokens_in: int
    tokens_out: int


class ApiBackend(AgentBackend):
    """The tool loop of the API backends: each turn sends the conversation and the four tools
    (harness/agents/_tools.py), runs the tools the reply asks for in the worktree and sends their output
    back, until a reply asks for none, `max_turns`, or the round's time is up. The SDKs' own retries are
    off: harness/agents/_retry.py retries 429 / 5xx / timeouts with backoff, visibly in the transcript.

    A provider implements `_client`, `_messages` (the opening conversation), `_send` (one request with its
    timeout, appending the assistant's message to the conversation and returning it as a `Reply`; a reply
    it cannot read raises MalformedReply) and `_add_results` (the tools' outputs, in its wire format)."""

    Options = ApiOptions
    key_env: str  # the environment variable holding the key, unless options.api_key_env names another

    def __init__(self, options: dict[str, Any] | None = None, model: str | None = None) -> None:
        super().__init__(options, model)
        if not model:
            raise ValueError(f"the {self.name} backend needs agent.model (the service's model name)")

    def _client(self, key: str) -> Any:
        raise NotImplementedError

    def _messages(self, task: AgentTask) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _send(self, client: Any, messages: list[dict[str, Any]], log: "Transcript", timeout_s: float) -> Reply:
        raise NotImplementedError

    def _add_results(self, messages: list[dict[str, Any]], results: list[tuple[ToolCall, str]]) -> None:
        raise NotImplementedError

    def run(self, task: AgentTask) -> AgentResult:
        o = self.options
        client = self._client(api_key(o, self.key_env))
        messages = self._messages(task)
        log = Transcript(task.log_dir)
        deadline = time.monotonic() + task.timeout_s
        turns, summary, error = 0, "", None
        while True:
            if turns >= o.max_turns:
                error = f"max_turns ({o.max_turns}) reached"
                break
            if time.monotonic() > deadline:
                error = "timeout"
                break
            task.meter.check()
            try:
                reply = call_with_retries(
                    lambda: self._send(client, messages, log, min(o.request_timeout_s, max(1.0, deadline - time.monotonic()))),
                    retries=o.retries, base_s=o.retry_base_s, deadline=deadline,
                    on_retry=lambda n, e, s: log.write("retry", attempt=n, error=type(e).__name__, wait_s=round(s, 2)))
            except DeadlineReached as e:
                error = f"timeout: {e}"
                break
            turns += 1
            task.meter.add(reply.tokens_in, reply.tokens_out,
                           cost_from_prices(reply.tokens_in, reply.tokens_out, o.price_in_per_mtok, o.price_out_per_mtok))
            summary = reply.text or summary
            if not reply.calls:
                break
            results = []
            for c in reply.calls:
                out = _tools.execute(c.name, _tools.parse_args(c.arguments), task,
                                     max_timeout_s=min(o.command_timeout_s, max(1.0, deadline - time.monotonic())))
                log.write("tool", name=c.name, input=c.arguments, output=out[:2000])
                results.append((c, out))
            self._add_results(messages, results)
        return AgentResult(summary=redact(summary[:2000]), error=error, turns=turns)


def malformed(e: Exception) -> MalformedReply:
    """A reply the SDK or the wire format could not read."""
    return MalformedReply(f"malformed reply: {type(e).__name__}: {str(e)[:200]}")


def api_key(options: ApiOptions, default_env: str) -> str:
    """The key from the vault; a missing key stops the run (never spends a round)."""
    name = options.api_key_env or default_env
    key = VAULT.get(name)
    if not key:
        raise AgentFatal(f"${name} is not set: the API backend has no key")
    return key


class Transcript:
    """Appends one redacted JSON line per event to `log_dir/transcript.jsonl`."""

    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / "transcript.jsonl"
        self.t0 = time.monotonic()

    def write(self, kind: str, **data: Any) -> None:
        line = json.dumps({"t": round(time.monotonic() - self.t0, 3), "kind": kind, **data}, default=str)
        with open(self.path, "a") as f:
            f.write(redact(line) + "\n")
