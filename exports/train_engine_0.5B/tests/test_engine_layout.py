"""The export's layout contract (exports/README.md): model_spec.toml agrees with the CLI's default
model, manifest.json has the harness's initial shape, the package imports nothing from the workspace,
and the README lists exactly the environment switches env.py reads."""

from __future__ import annotations

import json
import re
import tomllib

from engine_testlib import ENGINE, SRC

from train_engine_0_5b import cli
from train_engine_0_5b.core import env
from train_engine_0_5b.model_config import from_toml, preset


def test_model_spec_is_the_default_model():
    spec = tomllib.loads((ENGINE / "model_spec.toml").read_text())
    assert spec["engine"]["default_model"] == cli.DEFAULT_MODEL
    assert from_toml(ENGINE / "model_spec.toml") == preset(cli.DEFAULT_MODEL)
    assert (SRC / spec["engine"]["package"] / "__main__.py").is_file()
    assert [p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()] == [spec["engine"]["package"]]


def test_manifest_initial_shape():
    manifest = json.loads((ENGINE / "manifest.json").read_text())
    assert set(manifest) == {"engine", "spec", "gates", "hardware", "commit"} and manifest["engine"] == ENGINE.name


def test_engine_imports_nothing_from_the_workspace():
    pattern = re.compile(r"^\s*(from|import)\s+(gates|harness|benchmarks)\b", re.M)
    files = [*SRC.rglob("*.py"), *(ENGINE / "tests").rglob("*.py")]  # its tests too: they run from the export alone
    offenders = [str(f.relative_to(ENGINE)) for f in files if pattern.search(f.read_text())]
    assert not offenders


def test_environment_switches_are_listed_once():
    read = set(re.findall(r'"(FORGE_ENGINE_[A-Z_]+)"', (SRC / "train_engine_0_5b" / "core" / "env.py").read_text()))
    documented_env = set(re.findall(r"FORGE_ENGINE_[A-Z_]+[A-Z]", env.__doc__))
    in_readme = set(re.findall(r"`(FORGE_ENGINE_[A-Z_]+)`", (ENGINE / "README.md").read_text()))
    elsewhere = {f.name for f in SRC.rglob("*.py") if f.name != "env.py" and "FORGE_ENGINE_" in f.read_text()
                 and re.search(r"environ\W*\[?\W*.?FORGE_ENGINE_|getenv\(.FORGE_ENGINE_", f.read_text())}
    assert read == documented_env == in_readme and read
    assert not elsewhere  # only env.py reads them


def test_one_setup_path_and_one_place_for_parallelism():
    """The model part builds a Trainer only in build.py, and compiles or graphs only in parallelize.py."""
    only = {"Trainer(": "build.py", "AdamW(": "build.py", "Schedule(": "build.py",
            "torch.compile(": "parallelize.py", "GraphedStep(": "parallelize.py"}
    pkg = SRC / "train_engine_0_5b"
    for f in pkg.glob("*.py"):  # the model part: the core's folders (core/, ops/, data/) define these
        text = f.read_text()
        for call, home in only.items():
            assert call not in text or f.name == home, f"{f.name} calls {call} (only {home} may)"
