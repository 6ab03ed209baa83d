"""The run's memory on disk: the ledger (one JSONL line per round or event) and the run state.

State dir of a run (default `<repo>/.forge/<spec name>/`):

    run.json        RunState: run id, spec path + sha256, forge branch, engine      (atomic writes)
    inflight.json   the round in progress: its process groups (with their identity) and its usage so far
                    (absent between rounds)
    ledger.jsonl    append-only; fsync'd; a torn last line (kill -9 mid-write) is skipped on read
    rounds/<key>-rNN/   prompt.md, agent logs, changes.patch, gate reports
    worktrees/<key>-rNN/  the round's git worktree (removed when the round ends, with its engine's compile caches)
    compile-cache-seed/<key>/  the current op's baseline compile caches, copied into each of its rounds
    lock            flock'd by the live run

The ledger is the source of truth for resume: a stage passed iff a `round` line says so with a commit.
Every line is typed (`RoundRecord`, or an `Event` of EVENTS) and `Ledger` is the one reader and writer.
Nothing written here ever holds an API key: every line goes through harness.secrets.redact.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.procs import ProcRecord
from harness.secrets import redact

# error: the agent failed (the gates' verdict is in the note); agent_failed: it cannot work at all (the run stops)
VERDICTS = ("passed", "failed", "rejected", "error", "interrupted", "agent_unavailable", "agent_failed", "tampered")


class GateLine(BaseModel):
    name: str
    verdict: str
    metrics: dict[str, Any] = Field(default_factory=dict)  # the key numbers only
    time_s: float | None = None
    report: str | None = None


class RoundRecord(BaseModel):
    """One ledger line per round."""

    kind: Literal["round"] = "round"
    ts: float = Field(default_factory=time.time)
    run_id: str
    stage: str
    op: str | None = None
    round: int
    backend: str
    model: str | None = None
    isolation: str | None = None     # how the agent's processes ran: bwrap, or none (why)
    prompt_sha256: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    cost_usd: float | None = None
    wall_s: float = 0.0
    agent_s: float | None = None
    gate_s: float | None = None
    diff: dict[str, int] = Field(default_factory=dict)  # files, insertions, deletions
    changed: list[str] = Field(default_factory=list)
    forbidden: list[str] = Field(default_factory=list)
    verdict: str
    gates: list[GateLine] = Field(default_factory=list)
    agent_error: str | None = None
    timing: float | None = None      # ops stages: the candidate's metric value
    elected: bool | None = None      # ops stages: the candidate became the op's best
    base: str | None = None
    commit: str | None = None        # the commit holding the code the gates passed
    tip: str | None = None           # the branch tip after the round (commit + manifest)
    counted: bool = True             # counts against the stage's round budget
    note: str | None = None

    @property
    def key(self) -> str:
        return self.stage if self.op is None else f"{self.stage}-{self.op}"


class Event(BaseModel):
    """One ledger line that is not a round: something the run did (started, resumed, stopped, an op's baseline)."""

    model_config = ConfigDict(extra="allow")  # an event name this version does not know keeps its fields
    kind: Literal["event"] = "event"
    ts: float = Field(default_factory=time.time)
    run_id: str
    event: str


class RunStarted(Event):
    event: Literal["run_started"] = "run_started"
    spec: str
    spec_sha256: str
    branch: str
    base: str
    engine: str


class RunResumed(Event):
    event: Literal["run_resumed"] = "run_resumed"
    spec_sha256: str
    spec_changed: bool


class OrphansChecked(Event):
    """On resume: the process groups a killed run left, each ended or left alone (`procs`: what was done)."""
    event: Literal["orphans_checked"] = "orphans_checked"
    key: str
    round: int
    procs: list[str] = Field(default_factory=list)


class RunInterrupted(Event):
    event: Literal["run_interrupted"] = "run_interrupted"
    signal: str


class RunStopped(Event):
    event: Literal["run_stopped"] = "run_stopped"
    stage: str
    status: str
    message: str


class RunPassed(Event):
    event: Literal["run_passed"] = "run_passed"
    tip: str | None = None
    not_run: list[str] = Field(default_factory=list)


class OpBaseline(Event):
    """An ops stage's first figure for an op: the step on the gates' clock before any round."""
    event: Literal["op_baseline"] = "op_baseline"
    key: str
    op: str
    value: float | None = None
    note: str = ""


class OpDone(Event):
    """An op's rounds are spent: its best stays elected."""
    event: Literal["op_done"] = "op_done"
    stage: str
    op: str
    best: float | None = None
    best_round: int | None = None


EVENTS: dict[str, type[Event]] = {cls.model_fields["event"].default: cls for cls in (
    RunStarted, RunResumed, OrphansChecked, RunInterrupted, RunStopped, RunPassed, OpBaseline, OpDone)}
Record = RoundRecord | Event


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; torn or non-object lines (a crash mid-write) are skipped."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def parse(line: dict[str, Any]) -> Record | None:
    """A ledger line as its type (None for a line of neither kind, or one that does not validate)."""
    try:
        if line.get("kind") == "round":
            return RoundRecord.model_validate(line)
        if line.get("kind") == "event":
            return EVENTS.get(str(line.get("event")), Event).model_validate(line)
    except ValidationError:
        return None
    return None


E = TypeVar("E", bound=Event)


class Ledger:
    """The one reader and writer of a run's ledger.jsonl: typed records in, typed records out."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- writing --------------------------------------------------------------------------------------------
    def append(self, record: Record) -> None:
        line = redact(json.dumps(record.model_dump(mode="json"), sort_keys=True, default=str))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":       # a torn line from a killed writer: end it, skip it on read
                    f.write(b"\n")
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def event(self, run_id: str, event: str, **data: Any) -> None:
        """Append the event `event` (a name of EVENTS), its fields validated by its type."""
        self.append(EVENTS[event](run_id=run_id, **data))

    # -- reading --------------------------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """Every line as written (JSON objects), torn lines skipped: for copies and for readers of other versions."""
        return read_jsonl(self.path) if self.path.is_file() else []

    def typed(self) -> list[Record]:
        return [r for r in map(parse, self.records()) if r is not None]

    def rounds(self, key: str | None = None) -> list[RoundRecord]:
        """The round lines in order; of one stage or `stage-op` key if given."""
        return [r for r in self.typed() if isinstance(r, RoundRecord) and (key is None or r.key == key)]

    def events(self, kind: type[E]) -> list[E]:
        """The events of one type, in order."""
        return [r for r in self.typed() if isinstance(r, kind)]

    def op_baseline(self, key: str) -> OpBaseline | None:
        return next((e for e in self.events(OpBaseline) if e.key == key), None)

    def ops_done(self, stage: str) -> set[str]:
        """The ops of `stage` whose rounds are spent."""
        return {e.op for e in self.events(OpDone) if e.stage == stage}

    def totals(self) -> dict[str, float]:
        rs = self.rounds()
        return {"rounds": len(rs), "tokens_in": sum(r.tokens_in or 0 for r in rs),
                "tokens_out": sum(r.tokens_out or 0 for r in rs), "cost_usd": sum(r.cost_usd or 0.0 for r in rs),
                "wall_s": sum(r.wall_s for r in rs)}

    def copy_with(self, record: RoundRecord) -> bytes:
        """The ledger as written plus `record`: the copy a passing round commits beside the manifest."""
        lines = [json.dumps(r, sort_keys=True) for r in self.records()] + [record.model_dump_json()]
        return ("\n".join(lines) + "\n").encode()


class RunState(BaseModel):
    run_id: str
    spec_name: str
    spec_path: str
    spec_sha256: str
    branch: str
    engine: str
    created: float = Field(default_factory=time.time)


class Inflight(BaseModel):
    key: str
    stage: str
    op: str | None = None
    round: int
    worktree: str
    procs: list[ProcRecord] = Field(default_factory=list)  # every process group of the round, with its identity
    started: float = Field(default_factory=time.time)
    prompt_sha256: str | None = None
    backend: str = ""
    model: str | None = None
    tokens_in: int | None = None     # usage counted so far (a kill -9 loses none of it)
    tokens_out: int | None = None
    cost_usd: float | None = None
    outbox: str | None = None        # the agent's outbox: a shell agent's usage file lies there after a kill -9


def write_json_atomic(path: Path, data: BaseModel | dict[str, Any]) -> None:
    payload = data.model_dump_json(indent=2) if isinstance(data, BaseModel) else json.dumps(data, indent=2, default=str)
    payload = redact(payload)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(payload + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLock:
    """flock on `<state>/lock`: one live run per state dir (released by the kernel even on kill -9)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RuntimeError(f"another forge run holds {self.path}") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
