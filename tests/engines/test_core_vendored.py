"""Every export's vendored core (core/, ops/, data/, minicpm/) and core tests (tests/core_<package>/) are engine_core/'s,
byte for byte, and match their stamps; the core's tests import the engine only through the export's engine_fixture."""

from __future__ import annotations

import pytest

from harness import vendor_core

EXPORTS = vendor_core.stamped_exports()


def test_the_engines_carry_a_vendored_core():
    names = [e.name for e in EXPORTS]
    assert {"train_engine_0.5B", "train_engine_8b"} <= set(names)  # an engine that vendors the core joins the list


@pytest.mark.parametrize("export", EXPORTS, ids=[e.name for e in EXPORTS])
def test_vendored_core_is_engine_core(export):
    problems = vendor_core.drift(export)
    assert not problems, "run `python -m harness.vendor_core` (or --adopt the export):\n" + "\n".join(problems)


def test_test_drift_is_found(tmp_path):
    """An edited, an added and a removed core test each show, against the stamp and against engine_core/tests;
    the export's own engine_fixture.py is not the core's."""
    import json
    import shutil

    v, source = vendor_core.vendored, vendor_core.SOURCE / vendor_core.vendored.TESTS
    copy = tmp_path / "core_pkg"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "engine_fixture.py").write_text("PACKAGE = 'pkg'\n")
    (copy / v.TEST_STAMP).write_text(json.dumps(v.stamp(copy, tests=True)))
    assert v.drift_tests(copy, source) == [] and "engine_fixture.py" not in v.test_files(copy)
    (copy / "test_timer.py").write_text("# edited\n")
    (copy / "test_extra.py").write_text("")
    (copy / "test_data.py").unlink()
    problems = v.drift_tests(copy, source)
    for name in ("test_timer.py: differs", "test_extra.py: in the export", "test_data.py: in the"):
        assert sum(p.startswith(name) for p in problems) == 2, (name, problems)
    (copy / v.TEST_STAMP).unlink()
    assert "missing" in v.drift_tests(copy, source)[0]


def test_the_core_tests_reach_the_engine_only_through_its_fixture():
    """engine_core/tests names no engine package and imports nothing of the workspace: the export's
    engine_fixture.py (PACKAGE, MODEL, SMALL_RUN, SLOW, small_model, build_trainer, model_holding) is how a vendored
    copy finds its engine."""
    import re

    pattern = re.compile(r"train_engine_|^\s*(from|import)\s+(gates|harness|benchmarks|engine_testlib)\b", re.M)
    source = vendor_core.SOURCE / vendor_core.vendored.TESTS
    assert not [rel for rel in vendor_core.vendored.test_files(source) if pattern.search((source / rel).read_text())]
    for export in EXPORTS:
        fixture = vendor_core.vendored.tests_dir(vendor_core.package_dir(export)) / "engine_fixture.py"
        text = fixture.read_text()
        names = ("PACKAGE =", "MODEL =", "SMALL_RUN =", "SLOW:", "def small_model(", "def build_trainer(", "def model_holding(")
        assert all(name in text for name in names), fixture


def test_drift_is_found(tmp_path):
    """An edited, an added and a removed file each show, against the stamp and against engine_core."""
    import shutil

    pkg = tmp_path / "pkg"
    for rel in vendor_core.vendored.files(vendor_core.SOURCE):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vendor_core.SOURCE / rel, pkg / rel)
    (pkg / vendor_core.vendored.STAMP).write_text(__import__("json").dumps(vendor_core.vendored.stamp(pkg)))
    assert vendor_core.vendored.drift(pkg, vendor_core.SOURCE) == []
    (pkg / "core" / "trainer.py").write_text("# edited\n")
    (pkg / "ops" / "extra.py").write_text("")
    (pkg / "data" / "sampler.py").unlink()
    problems = vendor_core.vendored.drift(pkg, vendor_core.SOURCE)
    for name in ("core/trainer.py: differs", "ops/extra.py: in the package", "data/sampler.py: in the"):
        assert sum(p.startswith(name) for p in problems) == 2, (name, problems)


def test_the_core_imports_nothing_of_the_model_part():
    """engine_core's imports stay inside core/, ops/, data/ and minicpm/ (relative), so any engine package can carry it."""
    import ast

    for rel in vendor_core.vendored.files(vendor_core.SOURCE):
        path = vendor_core.SOURCE / rel
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                here = path.parent.relative_to(vendor_core.SOURCE).parts  # e.g. ("ops", "adamw")
                target = here[: len(here) - node.level + 1] + tuple((node.module or "").split("."))
                assert target[0] in vendor_core.vendored.TREES, f"{rel}: from {'.' * node.level}{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(n.startswith(("train_engine", "gates", "harness")) for n in names), f"{rel}: {names}"
