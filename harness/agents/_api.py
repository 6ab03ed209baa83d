"""What the two API backends (anthropic, openai) share: options, the key lookup, the transcript."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from harness.agents._env import redact
from harness.agents.base import AgentBackend, AgentUnavailable

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


class ApiBackend(AgentBackend):
    """Shared by the API backends: their options, and the model name they cannot run without."""

    Options = ApiOptions

    def __init__(self, options: dict[str, Any] | None = None, model: str | None = None) -> None:
        super().__init__(options, model)
        if not model:
            raise ValueError(f"the {self.name} backend needs agent.model (the service's model name)")


def api_key(options: ApiOptions, default_env: str) -> str:
    """The key from the harness's environment; a missing key stops the run (never spends a round)."""
    name = options.api_key_env or default_env
    key = os.environ.get(name)
    if not key:
        raise AgentUnavailable(f"${name} is not set: the API backend has no key")
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
