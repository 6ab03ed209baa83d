"""pytest hooks and fixtures for the engine's tests; the helpers live in engine_testlib.py."""

from __future__ import annotations

import pytest
import torch

import engine_testlib  # noqa: F401  (puts src/ and the workspace on sys.path)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU machines")
    config.addinivalue_line("markers", "slow: multi-process or multi-second tests")


@pytest.fixture
def cli():
    """Run the engine's CLI in this process: cli(args) -> click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from train_engine_0_5b.cli import app

    runner = CliRunner()

    def invoke(args: list, env: dict | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)

    return invoke


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread per test process: on a small shared CPU two OpenMP threads wait on each
    other at every op (a 40x slowdown measured on the 2-core CI box); subprocesses get
    OMP_NUM_THREADS=1 from engine_testlib.engine_env. Module scope: set before module fixtures run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
