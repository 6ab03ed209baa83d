"""The workspace's tests of exported engines against what only the workspace has: the reference stacks, the
gates' probe contract, `agent-loop.sh`, the vendored-copy drift checks. The engines' own tests (under
exports/<engine>/tests) never import the workspace; these reuse their helpers (engine_testlib)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ENGINE_TESTS = Path(__file__).resolve().parents[2] / "exports" / "train_engine_0.5B" / "tests"
if str(ENGINE_TESTS) not in sys.path:
    sys.path.insert(0, str(ENGINE_TESTS))

import engine_testlib  # noqa: E402  (puts the engine's src/ on sys.path)


@pytest.fixture
def cli():
    """Run the engine's CLI in this process: cli(args) -> click Result (exit_code, stdout, stderr)."""
    return engine_testlib.cli_runner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Module scope: set before module fixtures run (engine_testlib.single_thread says why)."""
    with engine_testlib.single_thread():
        yield
