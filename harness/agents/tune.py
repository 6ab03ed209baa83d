"""`tune`: the built-in non-LLM backend for per-op rounds. It searches the tunable space the engine declares for one
implementation of the round's op (ops/table.py of the engine, read through the gates' per-op harness).

Every trial is one candidate (values of the declared parameters) checked and timed by the per-op harness
(gates/ops): a candidate that is wrong, however fast, is rejected there and never elected. The search is the
full grid when it fits in `max_trials`, else `random_trials` random points, then coordinate descent from the best
(one parameter at a time over its values, until no step improves or the trials are spent). Every trial goes to
the op's leaderboard in the export; the best correct values are written into the engine's tuned-config file,
under this runtime's key. The loop's gates and its election on the gates' clock then decide whether they count.
Every trial goes to `op_trials.json` in the round's log dir; the loop puts them on the op's leaderboard.
Offline, free. An unknown op, implementation or parameter, or a value outside the declared domain, is an error.
The search of one op (`tune_op`) is also what the GPU session's tune part runs (benchmarks/gpu/tune_ops.py).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from gates.launch import discover_engine
from gates.engine_venv import venv_of
from gates.ops.harness import (Candidate, CandidateResult, EngineOps, HarnessOptions, OpSpecError, Runner,
                               check_candidate, describe, run_plain)
from harness.agents._proc import run_process
from harness.agents.base import AgentBackend, AgentResult, AgentTask
from harness.secrets import child_env

if TYPE_CHECKING:
    from harness.isolation import RoundBox


TRIALS = "op_trials.json"  # in the round's agent log dir (harness-side): every trial, for the op's leaderboard


class TuneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    impl: str | None = Field(None, description="the implementation whose space is searched; None: the op's first "
                             "registered implementation that declares one")
    space: dict[str, list[Any]] = Field(default_factory=dict, description="parameter -> the values to try (within its "
                                        "declared domain); the others keep their values. Empty: every declared "
                                        "parameter over its whole domain")
    max_trials: int = Field(32, ge=1)
    random_trials: int = Field(8, ge=1, description="random points before coordinate descent, when the grid is larger")
    seed: int = 0
    tuned_file: str = Field("src/{package}/tuned/configs.json", description="relative to the engine dir")
    harness: HarnessOptions = Field(default_factory=HarnessOptions, description="the per-op harness's options; "
                                    "device defaults to the spec's hardware")


class TuneError(ValueError):
    """The round cannot search: an unknown name, or nothing to tune."""


def search_space(engine_ops: EngineOps, op: str, impl: str, chosen: dict[str, list[Any]]) -> dict[str, list[Any]]:
    declared = engine_ops.space(op, impl)
    for name, values in chosen.items():  # every value must be declared: checked here, and again in the engine
        for v in values:
            engine_ops.check(Candidate(op=op, impl=impl, values={name: v}))
    return {name: list(values) for name, values in chosen.items()} or {n: list(p["domain"]) for n, p in declared.items()}


def _pick_impl(engine_ops: EngineOps, op: str, impl: str | None, device: str) -> str:
    """`impl`, else what `auto` runs on `device` when it declares a space, else the first registered one that does."""
    base = op.partition(".")[0]
    if (why := engine_ops.unknown(op)) is not None:
        raise OpSpecError(why)
    if impl is not None:
        engine_ops.impl(op, impl)
        return impl
    registered, impls = engine_ops.registered.get(base, []), engine_ops.table[base]["impls"]
    order = [*engine_ops.table[base]["defaults"].get(device, []), *impls]
    for name in order:
        if name in registered and impls.get(name, {}).get("space"):
            return name
    raise TuneError(f"{op}: no registered implementation declares a tunable space here")


def write_tuned(path: Path, key: dict, op: str, impl: str, values: dict[str, Any],
                note: str = "elected by forge's tune backend") -> None:
    """Set `values` for op=impl in the entry of runtime `key` (the engine's tuned-config format, ops/space.py);
    `note` says where a new entry came from."""
    data = json.loads(path.read_text()) if path.is_file() else {"entries": []}
    entry = next((e for e in data["entries"] if e["key"] == key), None)
    if entry is None:
        entry = {"key": key, "ops": {}, "note": note}
        data["entries"].append(entry)
    entry["ops"].setdefault(op, {}).setdefault(impl, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def round_runner(base_env: dict[str, str], box: "RoundBox | None", on_spawn: Callable[[int], None]) -> Runner:
    """Runs the per-op harness's child in the round's sandbox (the worktree read-only), its group recorded."""

    def run(argv: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> tuple[int | None, bool, str]:
        run_env = child_env(base_env) | env
        if box is not None:  # the engine's venv lives in the forge cache, a scratch path there
            venv = venv_of(argv[0])
            shown = (venv,) if venv is not None else ()
            argv, run_env = box.wrap(argv, run_env, worktree_rw=False, writable=(cwd,), read_only=shown, cwd=cwd)
        r = run_process(argv, cwd=cwd, env=run_env, timeout_s=timeout_s, log_dir=cwd / "logs", name="op-harness",
                        on_spawn=on_spawn)
        return (None if r.timed_out else r.returncode), r.timed_out, r.stderr

    return run


def check_options(options: TuneOptions, engine_ops: EngineOps, op: str, device: str) -> str:
    """The implementation the options tune for `op`; raises OpSpecError / TuneError on a name the engine does not
    declare (the loop calls it before a run starts, the backend again each round)."""
    impl = _pick_impl(engine_ops, op, options.impl, device)
    search_space(engine_ops, op, impl, options.space)
    return impl


class TuneBackend(AgentBackend):
    name = "tune"
    Options = TuneOptions

    def run(self, task: AgentTask) -> AgentResult:
        o = self.options
        task.meter.add(0, 0, 0.0)  # offline and free
        op = task.op or ""
        device = task.extra.get("device") or o.harness.device
        harness = o.harness.model_copy(update={"device": device})
        try:
            runner = round_runner(task.env, task.box, task.on_spawn)
            engine_ops = describe(task.engine_dir, runner=runner)
            impl = check_options(o, engine_ops, op, device)
            space = search_space(engine_ops, op, impl, o.space)
        except (OpSpecError, TuneError) as e:
            return AgentResult(error=f"tune: {e}")
        if not space:
            return AgentResult(error=f"tune: {op}={impl} declares no tunable parameters")
        preset = task.extra.get("preset") or "tiny"
        trials = tune_op(task.engine_dir, op, impl, space, o.model_copy(update={"harness": harness}), preset=preset,
                         engine_ops=engine_ops, runner=runner)
        task.log_dir.mkdir(parents=True, exist_ok=True)
        (task.log_dir / TRIALS).write_text(json.dumps({"harness": harness.model_dump(),  # the loop's leaderboard reads it
                                                       "trials": [t.model_dump() for t in trials]}, indent=1) + "\n")
        rejected = sum(t.verdict != "passed" for t in trials)
        best = best_trial(trials)
        if best is None:
            return AgentResult(summary=f"tune: {len(trials)} trials, none correct", error="no correct candidate",
                               turns=len(trials))
        key = engine_ops.runtime["cuda" if device == "cuda" else "cpu"]
        path = task.engine_dir / o.tuned_file.format(package=discover_engine(task.engine_dir).package)
        write_tuned(path, key, op.partition(".")[0], impl, best.values)
        return AgentResult(summary=f"tune: {op}={impl}: {len(trials)} trials ({rejected} rejected by the per-op "
                                   f"harness); best {best.values} at {best.ms:.4g} ms", turns=len(trials))

    def _search(self, space: dict[str, list[Any]], score, spent) -> dict[str, Any] | None:
        o = self.options
        return search(space, score, spent, max_trials=o.max_trials, random_trials=o.random_trials, seed=o.seed)


def search(space: dict[str, list[Any]], score: Callable[[dict[str, Any]], float], spent: Callable[[], int], *,
           max_trials: int, random_trials: int, seed: int) -> dict[str, Any] | None:
    """The best point of `space` by `score` (lower is better, inf: wrong): the full grid when it fits in
    `max_trials` (as `spent` counts them), else random points, then coordinate descent from the best."""
    keys = list(space)
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*space.values())]
    if len(grid) <= max_trials:
        return min(grid, key=score)
    rng = random.Random(seed)
    best = min((rng.choice(grid) for _ in range(max(1, min(random_trials, max_trials - spent())))), key=score)
    improved = True
    while improved and spent() < max_trials:  # coordinate descent from the best random point
        improved = False
        for k in keys:
            for v in space[k]:
                if spent() >= max_trials:
                    break
                cand = best | {k: v}
                if score(cand) < score(best):
                    best, improved = cand, True
    return best


@dataclass(frozen=True)
class Window:
    """When trials may run (time.monotonic() values): none starts at or after `last_start`; each is killed at `end`."""

    last_start: float
    end: float


def tune_op(engine_dir: Path, op: str, impl: str, space: dict[str, list[Any]], options: TuneOptions, *, preset: str,
            engine_ops: EngineOps, runner: Runner = run_plain, baseline: dict[str, Any] | None = None,
            window: Window | None = None,
            on_trial: Callable[[CandidateResult], None] | None = None) -> list[CandidateResult]:
    """Every trial of the search of `space` for op=impl, each checked and timed by the per-op harness with
    `options.harness`; `baseline` (e.g. the declared defaults) is tried first; outside `window` no trial runs
    (a point not run scores inf and is not a trial)."""
    trials: list[CandidateResult] = []

    def score(point: dict[str, Any]) -> float:
        for t in trials:
            if t.values == point:
                return t.ms if t.ms is not None else math.inf
        harness = options.harness
        if window is not None:
            now = time.monotonic()
            if now >= window.last_start or now >= window.end:
                return math.inf
            harness = harness.model_copy(update={"timeout_s": min(harness.timeout_s, window.end - now)})
        r = check_candidate(engine_dir, Candidate(op=op, impl=impl, values=point), preset=preset, options=harness,
                            engine_ops=engine_ops, runner=runner)
        trials.append(r)
        if on_trial is not None:
            on_trial(r)
        return r.ms if r.ms is not None else math.inf

    if baseline is not None:
        score(baseline)
    search(space, score, lambda: len(trials), max_trials=options.max_trials, random_trials=options.random_trials,
           seed=options.seed)
    return trials


def best_trial(trials: list[CandidateResult]) -> CandidateResult | None:
    """The fastest correct trial, or None."""
    return min((t for t in trials if t.ms is not None), key=lambda t: t.ms, default=None)
