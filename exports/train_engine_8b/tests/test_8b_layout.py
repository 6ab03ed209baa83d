"""The export's layout contract: the package and its tests import nothing from the forge workspace (they run from
the export alone), and the model part builds its Trainer only in build.py and compiles only in parallelize.py."""

from __future__ import annotations

import re
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1]
PKG = ENGINE / "src" / "train_engine_8b"


def test_engine_imports_nothing_from_the_workspace():
    pattern = re.compile(r"^\s*(from|import)\s+(gates|harness|benchmarks|train_engine_0_5b)\b", re.M)
    files = [*PKG.rglob("*.py"), *(ENGINE / "tests").rglob("*.py")]
    assert not [str(f.relative_to(ENGINE)) for f in files if pattern.search(f.read_text())]


def test_one_setup_path_and_one_place_for_parallelism():
    only = {"Trainer(": "build.py", "AdamW(": "build.py", "Schedule(": "build.py", "torch.compile(": "parallelize.py",
            ".compile(": "parallelize.py", "parallelize_module(": "parallelize.py"}
    for f in PKG.glob("*.py"):  # the model part: the vendored folders (core/, ops/, data/, minicpm/) define these
        text = f.read_text()
        for call, home in only.items():
            assert call not in text or f.name == home, f"{f.name} calls {call} (only {home} may)"
