"""Timing a candidate for an ops stage: the spec's timing command, run in the engine dir.

The command writes a JSON object to `{out}` (or prints it as its last stdout line); `metric` is read from
it. A command that fails, times out or omits the metric yields None: a candidate without a time is
never elected.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.agents._proc import fill_placeholders


def run_timing(command: str, *, engine_dir: Path, env: dict[str, str], package: str, op: str | None,
               metric: str, timeout_s: float) -> tuple[float | None, str]:
    """(metric value or None, a one-line note on what happened)."""
    with tempfile.TemporaryDirectory(prefix="forge-timing-") as tmp:
        out = Path(tmp) / "timing.json"
        cmd = fill_placeholders(command, {"python": sys.executable, "package": package, "op": op or "", "out": out})
        run_env = dict(env)
        src = str(engine_dir / "src")
        run_env["PYTHONPATH"] = src + (":" + run_env["PYTHONPATH"] if run_env.get("PYTHONPATH") else "")
        try:
            r = subprocess.run(["bash", "-c", cmd], cwd=engine_dir, env=run_env, capture_output=True, text=True,
                               timeout=timeout_s, start_new_session=True)
        except subprocess.TimeoutExpired:
            return None, f"timing command timed out after {timeout_s:.0f} s"
        if r.returncode != 0:
            return None, f"timing command exited {r.returncode}: {r.stderr.strip()[-300:]}"
        text = out.read_text() if out.is_file() else (r.stdout.strip().splitlines() or [""])[-1]
        try:
            value = float(json.loads(text)[metric])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None, f"timing output has no numeric {metric!r}: {text[:200]!r}"
        return value, f"{metric}={value:.6g}"
