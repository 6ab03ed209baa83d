"""The one interface every agent backend implements, and what a round hands it and gets back.

A backend edits files in `task.worktree` (a git worktree of the export's repository) and reports what
it spent. It never commits, never runs the gates for the harness, and sees only `task.env`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict


@dataclass
class AgentTask:
    stage: str
    round: int
    prompt: str
    prompt_file: Path                 # the same prompt, on disk (outside the worktree)
    worktree: Path                    # root of the round's git worktree
    engine_dir: Path                  # the export inside the worktree
    env: dict[str, str]               # the only environment the agent's processes get
    timeout_s: float
    log_dir: Path                     # transcripts and tool logs (outside the worktree)
    op: str | None = None             # ops stages: the op of this round
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the stage's timing command
    on_spawn: Callable[[int], None] = lambda pid: None   # the loop records child pids for resume


@dataclass
class AgentResult:
    summary: str = ""
    tokens_in: int | None = None
    tokens_out: int | None = None
    cost_usd: float | None = None
    error: str | None = None          # "timeout", "exit 3", ...: a result, not an exception
    turns: int | None = None


class AgentUnavailable(RuntimeError):
    """The service kept failing (429 / 5xx / timeouts) past every retry: the loop stops without
    spending the round, and `forge --resume` retries it later."""


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentBackend(ABC):
    """One agent backend. `Options` validates the spec's [agent.options] (errors name the field)."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: dict[str, Any] | None = None, model: str | None = None) -> None:
        self.options = self.Options.model_validate(options or {})
        self.model = model

    @abstractmethod
    def run(self, task: AgentTask) -> AgentResult:
        """Edit the worktree toward the prompt's goal; return what it cost."""


def cost_from_prices(tokens_in: int | None, tokens_out: int | None,
                     price_in_per_mtok: float | None, price_out_per_mtok: float | None) -> float | None:
    """USD for a round from per-million-token prices, where the service reports tokens but no cost."""
    if price_in_per_mtok is None or price_out_per_mtok is None or tokens_in is None or tokens_out is None:
        return None
    return (tokens_in * price_in_per_mtok + tokens_out * price_out_per_mtok) / 1e6
