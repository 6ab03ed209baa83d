"""Vendor the engine core (engine_core/) into exports: `python -m harness.vendor_core [EXPORT ...]`.

Each export's package gets the core's `core/`, `ops/`, `data/` and `minicpm/` Python files (the previous copy's files
removed first) and `vendored_core.json`, their hashes (engine_core/core/vendored.py); its tests folder gets the
core's tests (engine_core/tests/) in `tests/core_<package>/` with `vendored_tests.json`, beside the export's own
`engine_fixture.py` there (which this leaves alone). `--check` changes nothing and exits 1 when a copy drifted;
`--adopt EXPORT` copies that export's vendored files back into engine_core/ (an op round edited them there), to
be vendored into the other exports next.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "engine_core"


def _load_vendored():
    """engine_core/core/vendored.py, loaded by path (engine_core is no installed package)."""
    spec = importlib.util.spec_from_file_location("engine_core_vendored", SOURCE / "core" / "vendored.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vendored = _load_vendored()


def package_dir(export: Path) -> Path:
    """The export's one package folder (src/<package>/)."""
    found = [p for p in (export / "src").iterdir() if (p / "__init__.py").is_file()]
    if len(found) != 1:
        raise SystemExit(f"{export}: expected one package under src/, found {[p.name for p in found]}")
    return found[0]


def stamped_exports() -> list[Path]:
    """Every export that carries a vendored core."""
    return sorted(p.parents[2] for p in (ROOT / "exports").glob(f"*/src/*/{vendored.STAMP}"))


def _copy(src_root: Path, dst_root: Path, tests: bool = False) -> None:
    """Replace dst_root's core files by src_root's (both laid out as TREES/...; with tests: the core's tests)."""
    listed = vendored.test_files if tests else vendored.files
    for rel in listed(dst_root) if dst_root.is_dir() else ():
        (dst_root / rel).unlink()
    for rel in listed(src_root):
        (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_root / rel, dst_root / rel)


def vendor(export: Path) -> dict:
    """Copy engine_core and its tests into `export` and write their stamps; returns the core's stamp."""
    pkg = package_dir(export)
    _copy(SOURCE, pkg)
    stamp = vendored.stamp(pkg)
    (pkg / vendored.STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    tests = vendored.tests_dir(pkg)
    _copy(SOURCE / vendored.TESTS, tests, tests=True)
    if not (tests / vendored.LOCAL[0]).is_file():
        raise SystemExit(f"{tests}: the export's {vendored.LOCAL[0]} is missing (its package, small model and "
                         f"small-run options for the core's tests; see engine_core/tests/README.md)")
    test_stamp = vendored.stamp(tests, tests=True)
    (tests / vendored.TEST_STAMP).write_text(json.dumps(test_stamp, indent=2) + "\n", encoding="utf-8")
    return stamp


def drift(export: Path) -> list[str]:
    """Where `export`'s vendored core or core tests differ from their stamps or from engine_core/."""
    pkg = package_dir(export)
    return vendored.drift(pkg, SOURCE) + vendored.drift_tests(vendored.tests_dir(pkg), SOURCE / vendored.TESTS)


def main(exports: Optional[list[Path]] = typer.Argument(None, help="export folders (default: every stamped export)"),
         check: bool = typer.Option(False, "--check", help="change nothing; exit 1 when a copy drifted"),
         adopt: Optional[Path] = typer.Option(None, "--adopt", help="copy this export's vendored core into engine_core/")) -> None:
    if adopt is not None:
        _copy(package_dir(adopt), SOURCE)
        _copy(vendored.tests_dir(package_dir(adopt)), SOURCE / vendored.TESTS, tests=True)
        print(f"engine_core/ <- {adopt}; vendor it into the other exports next")
        return
    targets = [Path(e) for e in exports] if exports else stamped_exports()
    drifted = False
    for export in targets:
        name = export.resolve().relative_to(ROOT) if export.resolve().is_relative_to(ROOT) else export
        if check:
            problems = drift(export)
            drifted |= bool(problems)
            print(f"{name}: " + ("drifted\n  " + "\n  ".join(problems) if problems else "matches engine_core"))
        else:
            print(f"{name}: vendored engine_core {vendor(export)['hash'][:12]}")
    sys.exit(1 if drifted else 0)


if __name__ == "__main__":
    typer.run(main)
