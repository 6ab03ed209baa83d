"""The GPU scripts' clock: engine_core/core/timer.py, the one the engines vendor (`from cuda_timer import ...`,
beside each script). Loaded by path: engine_core is no installed package, and the scripts run without an engine
on their path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "engine_core" / "core" / "timer.py"


def _load():
    spec = importlib.util.spec_from_file_location("engine_core_timer", SOURCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up by name
    spec.loader.exec_module(module)
    return module


_timer = _load()
L2_FLUSH_BYTES, Timing, interleaved_ms, time_calls = (_timer.L2_FLUSH_BYTES, _timer.Timing, _timer.interleaved_ms,
                                                      _timer.time_calls)
