"""gates/engine_venv.py: each engine runs on a venv of its own that reads the gate interpreter's packages, also
when the gate itself runs in a venv (the GPU image's layout), and inside the sandbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gates import engine_venv
from gates.launch import WORKSPACE, discover_engine, engine_argv
from gates.sandbox import bwrap_argv, isolation

ENGINE = WORKSPACE / "exports" / "train_engine_0.5B"
SHOW = "import json, sys, torch; print(json.dumps({'prefix': sys.prefix, 'torch': torch.__version__}))"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run(argv: list[str], **kw) -> dict:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_the_engine_runs_on_its_own_venv_with_the_gates_packages(cache):
    engine = discover_engine(ENGINE)
    argv = engine_argv(engine, ["info"])
    python = Path(argv[0])
    root = engine_venv.venv_dir(engine)
    assert python == root / "bin" / "python" and root.is_relative_to(cache)
    shown = run([str(python), "-c", SHOW], env={"PATH": os.environ["PATH"]})
    assert Path(shown["prefix"]).resolve() == root.resolve() != Path(sys.prefix).resolve()
    assert shown["torch"] == __import__("torch").__version__  # the gate's torch, read through the .pth line
    stamp = (root / engine_venv.MARKER).stat().st_mtime_ns
    assert engine_argv(engine, ["info"], nproc=2)[:3] == [str(python), "-m", "torch.distributed.run"]
    assert (root / engine_venv.MARKER).stat().st_mtime_ns == stamp  # made once, then reused


def test_another_interpreter_or_package_dirs_get_another_venv(cache, monkeypatch, tmp_path):
    engine = discover_engine(ENGINE)
    first = engine_venv.venv_dir(engine)
    extra = tmp_path / "more-packages"
    extra.mkdir()
    monkeypatch.setattr(engine_venv, "gate_site_dirs", lambda: [str(extra)])
    assert engine_venv.venv_dir(engine) != first


NESTED = textwrap.dedent("""
    import json, subprocess, sys
    sys.path.insert(0, {workspace!r})
    from gates.launch import discover_engine
    from gates.engine_venv import engine_python
    py = engine_python(discover_engine({engine!r}))
    code = "import json, sys, forge_marker_module; print(json.dumps({{'prefix': sys.prefix, 'marker': forge_marker_module.WHO}}))"
    print(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)
""")


def test_a_gate_inside_a_venv_gives_the_engine_that_venvs_packages(cache, tmp_path):
    """The GPU image runs the gates from a venv (/opt/torch/.venv) holding torch: the engine's venv must read
    that venv's site-packages, not the base interpreter's. A module only the gate's venv has stands for torch."""
    gate_venv = tmp_path / "gate-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(gate_venv)], check=True,
                   timeout=120)
    purelib = subprocess.run([str(gate_venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "forge_marker_module.py").write_text("WHO = 'the gate venv'\n")
    shown = run([str(gate_venv / "bin" / "python"), "-c", NESTED.format(workspace=str(WORKSPACE), engine=str(ENGINE))],
                env={"PATH": os.environ["PATH"], "FORGE_CACHE_DIR": str(cache)})
    assert shown["marker"] == "the gate venv" and Path(shown["prefix"]).is_relative_to(cache)


def test_the_sandbox_shows_the_engine_its_venv_read_only(cache, tmp_path):
    iso = isolation("required")
    if iso.method != "bwrap":
        pytest.skip(f"no sandbox here: {iso.reason}")
    engine = discover_engine(ENGINE)
    python = engine_argv(engine, [])[0]
    box, compile_cache = tmp_path / "box", tmp_path / "compile"
    box.mkdir()
    compile_cache.mkdir()
    code = SHOW + "\nimport os; print(json.dumps({'prefix': sys.prefix, 'writable': os.access(sys.prefix, os.W_OK)}))"
    shown = run(bwrap_argv(iso, [python, "-c", code], box, engine, compile_cache, None), env={"PATH": os.environ["PATH"]})
    assert Path(shown["prefix"]).resolve() == engine_venv.venv_dir(engine).resolve()
    assert shown["writable"] is False
