"""Fixtures of the core's tests: one intra-op thread per test module, and the engine's CLI in this process."""

from __future__ import annotations

import pytest

from .core_testlib import engine_import, one_thread  # noqa: F401 - the autouse fixture, applied here


@pytest.fixture
def cli():
    """Run the engine's CLI in this process: cli(args, env=None) -> click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    app = engine_import("cli").app
    runner = CliRunner()

    def invoke(args: list, env: dict | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)

    return invoke
