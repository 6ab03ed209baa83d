"""Fixtures of the core's tests: one intra-op thread per test module, and the engine's CLI in this process."""

from __future__ import annotations

import pytest

from .core_testlib import engine_import


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread per test module (module scope: set before module fixtures run): on a small shared CPU
    two OpenMP threads wait on each other at every op (a 40x slowdown measured on the 2-core CI box);
    subprocesses get OMP_NUM_THREADS=1 from core_testlib.engine_env."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli():
    """Run the engine's CLI in this process: cli(args, env=None) -> click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    app = engine_import("cli").app
    runner = CliRunner()

    def invoke(args: list, env: dict | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)

    return invoke
