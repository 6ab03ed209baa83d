"""Repository-wide pytest setup: Triton's CPU interpreter, and the test tiers.

Without a GPU, Triton kernels run only under Triton's interpreter, and `TRITON_INTERPRET` must be set before
triton is first imported by anything in the session (the engine's op registry imports its Triton modules when
the engine is first imported). Set here, before any test module loads; with CUDA present the kernels compile
for the GPU as usual.

Tiers (markers, set by folder below; a test may add `slow` itself):
- `unit`: in-process checks of one piece (ops, configs, policies, parsers);
- `integration`: subprocesses, gates, engines and the loop end to end;
- `slow`: the second tier (`python3 -m pytest -m slow`, or `.ci/run --slow` after the default one; ~60 min): before a release;
- `gpu`: needs a CUDA device; skipped on CPU machines.
The default tier is `python3 -m pytest -m "not slow"` (README.md).
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent

# folder (relative to the repository root, most specific first) -> the markers its tests get
FOLDER_TIERS: list[tuple[str, tuple[str, ...]]] = [
    ("tests/redteam", ("integration", "slow")),
    ("tests/gates", ("integration",)),
    ("tests/harness", ("integration",)),
    ("tests/foundation", ("unit",)),
    ("tests/stacks", ("unit",)),
    ("tests/benchmarks", ("unit",)),
    ("tests/engines", ("integration",)),
    ("exports/train_engine_0.5B/tests/ops", ("unit",)),
    ("exports/train_engine_0.5B/tests", ("integration",)),
    ("exports/train_engine_8b/tests", ("integration",)),
]


def tiers_of(path: Path) -> tuple[str, ...]:
    """The markers of a test file from its folder; a file outside every listed folder is an error."""
    rel = path.resolve().relative_to(ROOT).as_posix()
    for folder, marks in FOLDER_TIERS:
        if rel.startswith(folder + "/"):
            return marks
    raise pytest.UsageError(f"{rel}: no test tier for its folder; add it to FOLDER_TIERS in conftest.py")


def pytest_configure(config):
    for name, why in (("unit", "in-process checks of one piece"),
                      ("integration", "subprocesses, gates, engines or the loop end to end"),
                      ("slow", "the second tier: multi-second or multi-process tests (CI runs it)"),
                      ("gpu", "needs a CUDA device; skipped on CPU machines")):
        config.addinivalue_line("markers", f"{name}: {why}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in tiers_of(Path(item.path)):
            item.add_marker(mark)
