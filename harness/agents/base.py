"""The one interface every agent backend implements, and what a round hands it and gets back.

A backend edits files in `task.worktree` (a git worktree of the export's repository), runs every process
through `task.box` (the round's sandbox), and counts what it spends on `task.meter` as each reply arrives
(so a round that fails or is interrupted still records it). It never commits, never runs the gates for
the harness, and sees only `task.env`. Its failures are results (`AgentResult.error`), except three that
end the round at once: AgentUnavailable (the service kept failing), AgentFatal (no retry can help) and
BudgetSpent (the run's token or cost budget is reached).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from harness.isolation import RoundBox


@dataclass
class Meter:
    """What a round has spent, counted reply by reply, and what it may spend (the run's budget left)."""

    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    reported: bool = False              # the backend reported usage (else the ledger says None)
    cost_reported: bool = False
    token_limit: int | None = None
    cost_limit: float | None = None
    on_change: Callable[["Meter"], None] = lambda m: None

    def add(self, tokens_in: int = 0, tokens_out: int = 0, cost_usd: float | None = None) -> None:
        self.tokens_in += int(tokens_in or 0)
        self.tokens_out += int(tokens_out or 0)
        if cost_usd is not None:
            self.cost_usd += float(cost_usd)
            self.cost_reported = True
        self.reported = True
        self.on_change(self)

    def settle(self, tokens_in: int | None, tokens_out: int | None, cost_usd: float | None) -> None:
        """A CLI's own final totals replace what was counted from its stream (they include what it did not print)."""
        if tokens_in is not None or tokens_out is not None:
            self.tokens_in, self.tokens_out, self.reported = int(tokens_in or 0), int(tokens_out or 0), True
        if cost_usd is not None:
            self.cost_usd, self.cost_reported = float(cost_usd), True
        self.on_change(self)

    def spent(self) -> str | None:
        """Why no further call may be made, if the budget is reached."""
        tokens = self.tokens_in + self.tokens_out
        if self.token_limit is not None and tokens >= self.token_limit:
            return f"token budget reached: the round spent {tokens} of the {self.token_limit} tokens left to the run"
        if self.cost_limit is not None and self.cost_usd >= self.cost_limit:
            return f"cost budget reached: the round spent ${self.cost_usd:.4f} of the ${self.cost_limit:.4f} left to the run"
        return None

    def check(self) -> None:
        """Before every call to a service: BudgetSpent once the budget is reached."""
        why = self.spent()
        if why:
            raise BudgetSpent(why)


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
    box: "RoundBox"                   # the round's sandbox: every process of the agent runs through it
    meter: Meter = field(default_factory=Meter)
    op: str | None = None             # ops stages: the op of this round
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the stage's timing command
    on_spawn: Callable[[int], None] = lambda pid: None   # the loop records each child's group for resume


@dataclass
class AgentResult:
    summary: str = ""
    error: str | None = None          # "timeout", "exit 3", ...: a result, not an exception (the round is `error`)
    turns: int | None = None


class AgentUnavailable(RuntimeError):
    """The service kept failing (429 / 5xx / timeouts / malformed replies) past every retry: the loop stops
    without spending the round, and `forge --resume` retries it later."""


class AgentFatal(RuntimeError):
    """A failure no retry can fix (the key refused: 401 / 403, an unknown model, a missing CLI): the run
    stops at once, without spending the round."""


class BudgetSpent(RuntimeError):
    """The run's token or cost budget is reached before a call (or a CLI agent reached it and was stopped)."""


# Words in a CLI agent's error that no retry can fix (its key or login, its model).
FATAL_TEXT = re.compile(r"invalid api key|invalid x-api-key|authentication|unauthori[sz]ed|\b40[13]\b|"
                        r"not logged in|please run /login|log ?in again|(unknown|invalid|unsupported) model|"
                        r"model .{0,60}(not found|does not exist|not supported)", re.IGNORECASE)


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
