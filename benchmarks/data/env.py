"""What a data benchmark records about where it ran: hardware, versions, commit, command, load average."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "numpy", "datasets", "tokenizers", "pyarrow", "train_engine_0_5b")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or os.environ.get("FORGE_GIT_COMMIT") or None


def load() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared: a figure is only as good as its quiet)."""
    return [round(x, 2) for x in os.getloadavg()]


def record(command: list[str]) -> dict:
    versions = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": commit(),
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.data", *command]),
            "hardware": {"cpu": _cpu_model(), "cores": os.cpu_count(), "mem_gib": _mem_total_gib(),
                         "tmp_free_gib": round(shutil.disk_usage("/tmp").free / 2**30, 1), "machine": platform.machine(),
                         "kernel": platform.release()},
            "versions": versions, "load_avg_start": load()}
