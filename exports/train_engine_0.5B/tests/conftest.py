"""pytest hooks and fixtures for the engine's tests; the helpers and fixtures live in engine_testlib.py."""

from __future__ import annotations

from engine_testlib import cli, one_thread  # noqa: F401 - fixtures (importing it also puts src/ on sys.path)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU machines")
    config.addinivalue_line("markers", "slow: multi-process or multi-second tests")
