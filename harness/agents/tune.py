"""`tune`: the built-in non-LLM backend for per-op rounds. It searches a kernel's configuration space.

The op's tunables live in one config file of the engine (JSON, or TOML of tables and scalars). The
space maps dotted keys (with `{op}` filled in) to candidate values. Each trial writes the file, runs
the timing command (the option, else the stage's [stages.timing]) and reads the metric; the search is
the full grid when it fits in `max_trials`, else coordinate descent from the current values. The best
configuration is left in the file: the harness's gates then decide whether it counts. Offline, free.
"""

from __future__ import annotations

import itertools
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from harness.agents.base import AgentBackend, AgentResult, AgentTask
from harness.timing import run_timing


class TuneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config_file: str = Field(description="relative to the engine dir; .json or .toml")
    space: dict[str, list[Any]] = Field(description="dotted key ({op} allowed) -> candidate values")
    timing_command: str | None = None
    metric: str | None = None
    minimize: bool | None = None
    max_trials: int = Field(64, ge=1)
    trial_timeout_s: float = Field(600.0, gt=0)


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for k, v in data.items():
        if isinstance(v, dict):
            out.append(_dump_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(x for x in out if x) + "\n"


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n" if path.suffix == ".json" else _dump_toml(data))


def _get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


class TuneBackend(AgentBackend):
    name = "tune"
    Options = TuneOptions

    def run(self, task: AgentTask) -> AgentResult:
        o = self.options
        task.meter.add(0, 0, 0.0)  # offline and free
        timing = task.extra.get("timing") or {}
        command = o.timing_command or timing.get("command")
        if not command:
            return AgentResult(error="tune: no timing command (set [stages.timing] or options.timing_command)")
        metric = o.metric or timing.get("metric", "time_s")
        sign = 1.0 if (o.minimize if o.minimize is not None else timing.get("minimize", True)) else -1.0
        space = {k.format(op=task.op or ""): list(v) for k, v in o.space.items() if v}
        path = task.engine_dir / o.config_file
        base = _load(path)
        trials: list[tuple[dict[str, Any], float | None, str]] = []

        def score(point: dict[str, Any]) -> float:
            for prior, value, _ in trials:
                if prior == point:
                    return sign * value if value is not None else math.inf
            cfg = json.loads(json.dumps(base))
            for k, v in point.items():
                _set(cfg, k, v)
            _save(path, cfg)
            value, note = run_timing(command, engine_dir=task.engine_dir, env=task.env,
                                     package=task.extra.get("package", ""), op=task.op, metric=metric,
                                     timeout_s=o.trial_timeout_s, box=task.box, on_spawn=task.on_spawn)
            trials.append((dict(point), value, note))
            return sign * value if value is not None else math.inf

        keys = list(space)
        grid_size = math.prod(len(v) for v in space.values())
        if grid_size <= o.max_trials:
            best = min((dict(zip(keys, combo)) for combo in itertools.product(*space.values())), key=score)
        else:
            best = {k: (_get(base, k) if _get(base, k) in space[k] else space[k][0]) for k in keys}
            improved = True
            while improved and len(trials) < o.max_trials:
                improved = False
                for k in keys:
                    for v in space[k]:
                        if len(trials) >= o.max_trials:
                            break
                        cand = best | {k: v}
                        if score(cand) < score(best):
                            best, improved = cand, True
        best_value = score(best) if keys else math.inf
        task.log_dir.mkdir(parents=True, exist_ok=True)
        (task.log_dir / "tune_trials.json").write_text(json.dumps(
            [{"point": p, metric: v, "note": n} for p, v, n in trials], indent=2) + "\n")
        if math.isinf(best_value):
            if base:
                _save(path, base)
            else:
                path.unlink(missing_ok=True)
            return AgentResult(summary="tune: no candidate produced a time", error="no timed candidate",
                               turns=len(trials))
        final = json.loads(json.dumps(base))
        for k, v in best.items():
            _set(final, k, v)
        _save(path, final)
        return AgentResult(summary=f"tune: {len(trials)} trials; best {best} with {metric}={sign * best_value:.6g}",
                           turns=len(trials))
