"""The workspace's tests of exported engines against what only the workspace has: the reference stacks, the
gates' probe contract, `agent-loop.sh`, the vendored-copy drift checks. The engines' own tests (under
exports/<engine>/tests) never import the workspace; these reuse their helpers (engine_testlib)."""

from __future__ import annotations

import sys
from pathlib import Path

ENGINE_TESTS = Path(__file__).resolve().parents[2] / "exports" / "train_engine_0.5B" / "tests"
if str(ENGINE_TESTS) not in sys.path:
    sys.path.insert(0, str(ENGINE_TESTS))

from engine_testlib import cli, one_thread  # noqa: E402, F401 - the engine tests' fixtures (and its src/ on sys.path)
