"""Timing a candidate for an ops stage: on the gates' clock (M5's speed part: the engine's own `pretrain`,
timed from outside, its losses checked against the reference), or a spec's command run in the engine dir.

A timing that fails, times out or lacks the metric yields None: a candidate without a time is never elected.
A spec's command runs agent-written code: it runs in the round's sandbox, the worktree read-only.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.agents._proc import fill_placeholders, run_process
from harness.secrets import child_env

if TYPE_CHECKING:
    from harness.isolation import RoundBox


def run_timing(command: str, *, engine_dir: Path, env: dict[str, str], package: str, op: str | None,
               metric: str, timeout_s: float, box: "RoundBox | None" = None,
               on_spawn: Callable[[int], None] = lambda pid: None) -> tuple[float | None, str]:
    """(metric value or None, a one-line note on what happened)."""
    with tempfile.TemporaryDirectory(prefix="forge-timing-") as tmp:
        out = Path(tmp) / "timing.json"
        cmd = fill_placeholders(command, {"python": sys.executable, "package": package, "op": op or "", "out": out})
        run_env = child_env(env)
        src = str(engine_dir / "src")
        run_env["PYTHONPATH"] = src + (":" + run_env["PYTHONPATH"] if run_env.get("PYTHONPATH") else "")
        argv = ["bash", "-c", cmd]
        if box is not None:
            argv, run_env = box.wrap(argv, run_env, worktree_rw=False, writable=(Path(tmp),), cwd=engine_dir)
        r = run_process(argv, cwd=engine_dir, env=run_env, timeout_s=timeout_s, log_dir=Path(tmp) / "logs",
                        name="timing", on_spawn=on_spawn)
        if r.timed_out:
            return None, f"timing command timed out after {timeout_s:.0f} s"
        if r.returncode != 0:
            return None, f"timing command exited {r.returncode}: {r.stderr.strip()[-300:]}"
        text = out.read_text() if out.is_file() else (r.stdout.strip().splitlines() or [""])[-1]
        try:
            value = float(json.loads(text)[metric])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None, f"timing output has no numeric {metric!r}: {text[:200]!r}"
        return value, f"{metric}={value:.6g}"


def run_gate_timing(engine_dir: Path, *, case: str, device: str, metric: str, timeout_s: float,
                    options: dict) -> tuple[float | None, str]:
    """(metric or None, note) from M5's speed part on `engine_dir`: the gate's own clock, never the engine's."""
    from gates.context import GateRun
    from gates.launch import EngineLayoutError, discover_engine
    from gates.m5_long_train import speed_part
    from gates.model_config import preset
    from gates.runner import GateOptions

    try:
        engine = discover_engine(engine_dir)
    except EngineLayoutError as e:
        return None, f"gate timing: {e}"
    g = GateRun("m5_long_train", engine, GateOptions(case=case, device=device, timeout_s=timeout_s,
                                                     **({"mfu_threshold": 0.0} | options)))
    try:
        part = speed_part(g, preset(case))
    except Exception as e:  # noqa: BLE001 - a timing that breaks is a candidate without a time
        return None, f"gate timing crashed: {type(e).__name__}: {e}"
    finally:
        g.cleanup()
    value = part.numbers.get(metric)
    if part.verdict != "passed" or not isinstance(value, (int, float)):
        return None, f"gate timing {part.verdict}: {part.message[:300]}"
    return float(value), f"{metric}={value:.6g} on the gates' clock"
