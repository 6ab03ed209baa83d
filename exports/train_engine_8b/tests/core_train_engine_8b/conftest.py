"""Fixtures of the core's tests: one intra-op thread per test module, and the engine's CLI in this process; the
tests the engine names slow on it (engine_fixture.SLOW) join the slow tier."""

from __future__ import annotations

from pathlib import Path

import pytest

from .core_testlib import engine_import, one_thread  # noqa: F401 - the autouse fixture, applied here
from .engine_fixture import SLOW


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU machines")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:  # every item of the session: this folder's only
        path = Path(item.path)
        if path.parent == here and f"{path.stem}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def cli():
    """Run the engine's CLI in this process: cli(args, env=None) -> click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    app = engine_import("cli").app
    runner = CliRunner()

    def invoke(args: list, env: dict | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)

    return invoke
