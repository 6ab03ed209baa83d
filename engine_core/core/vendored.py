"""The vendored core's stamp. An engine package carries the forge workspace's engine_core/ (its `core/`,
`ops/`, `data/` and `minicpm/` Python files, copied by `python -m harness.vendor_core`) and, at the package root,
`vendored_core.json`: the sha256 of every copied file and of the whole set. `drift` says where a copy no
longer matches its stamp, so an edit made in one export is found before it silently forks the core.

The core's tests (engine_core/tests/) travel with it: copied into the export's `tests/core_<package>/` (a
folder name no other export's tests use, so one pytest run collects both), stamped there in
`vendored_tests.json` the same way; the export's own `engine_fixture.py` in that folder (its package, its small
model, its CLI's small-run options) is the one file there that is not vendored. `drift_tests` checks them.

Standard library only: the workspace's vendoring command loads this file by path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TREES = ("core", "ops", "data", "minicpm")  # the package folders the core owns (their .py files; other files are the engine's)
STAMP = "vendored_core.json"
TESTS = "tests"  # engine_core/tests: the core's tests
TEST_STAMP = "vendored_tests.json"
LOCAL = ("engine_fixture.py",)  # in an export's copy of the tests: the export's own, not vendored


def files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every .py file under root's TREES (root: engine_core/ or an engine package)."""
    out = {}
    for tree in TREES:
        for f in sorted((root / tree).rglob("*.py")):
            if "__pycache__" not in f.parts:
                out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return dict(sorted(out.items()))


def test_files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every .py file under root (engine_core/tests or an export's copy), but LOCAL's."""
    out = {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*.py"))
           if "__pycache__" not in f.parts and f.name not in LOCAL}
    return dict(sorted(out.items()))


def tests_dir(package_dir: Path) -> Path:
    """Where an export keeps its copy of the core's tests: exports/<engine>/tests/core_<package>/."""
    return package_dir.parents[1] / "tests" / f"core_{package_dir.name}"


def digest(hashes: dict[str, str]) -> str:
    """One sha256 for a set of files: of its sorted `path sha256` lines."""
    return hashlib.sha256("".join(f"{p} {h}\n" for p, h in sorted(hashes.items())).encode()).hexdigest()


def stamp(root: Path, tests: bool = False) -> dict:
    """The stamp of the core under `root` (of the tests in `root` with tests): {"hash": digest, "files": {path: sha256}}."""
    hashes = test_files(root) if tests else files(root)
    return {"hash": digest(hashes), "files": hashes}


def read_stamp(package_dir: Path) -> dict:
    return json.loads((package_dir / STAMP).read_text(encoding="utf-8"))


def drift(package_dir: Path, source: Path | None = None) -> list[str]:
    """Problems of the core vendored in `package_dir`: against its own stamp, and against `source` (the
    workspace's engine_core/) when given. Empty: the copy is the stamped one (and the source's)."""
    saved, now = read_stamp(package_dir), stamp(package_dir)
    problems = [] if saved["hash"] == digest(saved["files"]) else [f"{STAMP}: its hash is not the digest of its files"]
    problems += _compare(saved["files"], now["files"], "stamp", "package")
    if source is not None:
        problems += _compare(stamp(source)["files"], now["files"], "engine_core", "package")
    return problems


def drift_tests(tests_root: Path, source: Path | None = None) -> list[str]:
    """Problems of the core's tests vendored in `tests_root` (an export's tests/core_<package>/): against its
    TEST_STAMP, and against `source` (the workspace's engine_core/tests/) when given; empty: they are the stamped ones."""
    if not (tests_root / TEST_STAMP).is_file():
        return [f"{tests_root.name}/{TEST_STAMP}: missing (the core's tests are not vendored here)"]
    saved = json.loads((tests_root / TEST_STAMP).read_text(encoding="utf-8"))
    now = stamp(tests_root, tests=True)
    problems = [] if saved["hash"] == digest(saved["files"]) else [f"{TEST_STAMP}: its hash is not the digest of its files"]
    problems += _compare(saved["files"], now["files"], "stamp", "export's tests")
    if source is not None:
        problems += _compare(stamp(source, tests=True)["files"], now["files"], "engine_core tests", "export's tests")
    return problems


def _compare(want: dict[str, str], have: dict[str, str], want_name: str, have_name: str) -> list[str]:
    out = [f"{p}: in the {want_name}, missing from the {have_name}" for p in sorted(set(want) - set(have))]
    out += [f"{p}: in the {have_name}, not in the {want_name}" for p in sorted(set(have) - set(want))]
    out += [f"{p}: differs from the {want_name}" for p in sorted(set(want) & set(have)) if want[p] != have[p]]
    return out
