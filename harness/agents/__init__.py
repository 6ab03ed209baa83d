"""Agent backends: one module each behind harness/agents/base.py's interface, in one plain registry.

Backends that need an optional SDK are registered only when it imports; a spec may still name them
(harness/spec.py knows every name) and `get_backend` then says what to install.
"""

from __future__ import annotations

from typing import Any

from harness.agents.base import AgentBackend, AgentResult, AgentTask, AgentUnavailable
from harness.agents.claude_code import ClaudeCodeBackend
from harness.agents.codex import CodexBackend
from harness.agents.replay import ReplayBackend
from harness.agents.shell import ShellBackend
from harness.agents.tune import TuneBackend

BACKENDS: dict[str, type[AgentBackend]] = {
    "claude_code": ClaudeCodeBackend,
    "codex": CodexBackend,
    "shell": ShellBackend,
    "replay": ReplayBackend,
    "tune": TuneBackend,
}

try:
    from harness.agents.anthropic_api import AnthropicBackend

    BACKENDS["anthropic"] = AnthropicBackend
except ImportError:
    pass

try:
    from harness.agents.openai_api import OpenAIBackend

    BACKENDS["openai"] = OpenAIBackend
except ImportError:
    pass

_INSTALL = {"anthropic": "pip install anthropic", "openai": "pip install openai"}


class BackendError(ValueError):
    """A backend that is unknown, not installed, or given bad options (the message names the option)."""


def get_backend(name: str, options: dict[str, Any] | None = None, model: str | None = None) -> AgentBackend:
    from pydantic import ValidationError

    name = name.replace("-", "_")
    if name not in BACKENDS:
        hint = f" ({_INSTALL[name]})" if name in _INSTALL else ""
        raise BackendError(f"agent backend {name!r} is not available here{hint}; available: {', '.join(BACKENDS)}")
    try:
        return BACKENDS[name](options, model)
    except ValidationError as e:
        lines = [f"  agent.options.{'.'.join(map(str, err['loc']))}: "
                 f"{'unknown option' if err['type'] == 'extra_forbidden' else err['msg']}" for err in e.errors()]
        raise BackendError(f"invalid options for backend {name!r}:\n" + "\n".join(lines)) from None
    except ValueError as e:
        raise BackendError(str(e)) from None


__all__ = ["BACKENDS", "AgentBackend", "AgentResult", "AgentTask", "AgentUnavailable", "BackendError", "get_backend"]
