"""pytest hooks and fixtures for the engine's tests; the helpers live in engine_testlib.py."""

from __future__ import annotations

import engine_testlib  # puts src/ on sys.path
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU machines")
    config.addinivalue_line("markers", "slow: multi-process or multi-second tests")


@pytest.fixture
def cli():
    """Run the engine's CLI in this process: cli(args) -> click Result (exit_code, stdout, stderr)."""
    return engine_testlib.cli_runner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Module scope: set before module fixtures run (engine_testlib.single_thread says why)."""
    with engine_testlib.single_thread():
        yield
