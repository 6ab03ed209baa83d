"""Each engine's own interpreter: a venv per engine, made once under the forge cache.

Its site-packages belongs to that engine alone. The gate interpreter's packages (torch, triton, the carried
GPU wheels) are read through one `.pth` line that calls `site.addsitedir` on each of the gate's site
directories, so their own `.pth` files apply too. That works when the gate itself runs in a venv, where
`--system-site-packages` would reach the base interpreter's packages, not the gate's. So an engine never
runs on the reference's interpreter prefix: whatever lands in its environment stays in its own venv. Inside
the sandbox the venv is bound read-only (gates/sandbox.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import site
import subprocess
import sys
import tempfile
import threading
import venv
from pathlib import Path

from gates.launch import Engine, forge_cache_root

MARKER = "forge-engine-venv.json"
PTH = "_forge_gate_packages.pth"
_LOCK = threading.Lock()  # gate runs in threads (the red-team session) share one venv per engine


def gate_site_dirs() -> list[str]:
    """The gate interpreter's site directories, in its order (system, then the user's if enabled)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _recipe() -> dict:
    """What the venv is made from: a change (another interpreter, other package dirs) makes a fresh one."""
    return {"base": str(Path(getattr(sys, "_base_executable", sys.executable)).resolve()),
            "version": list(sys.version_info[:3]), "site_dirs": gate_site_dirs()}


def venv_dir(engine: Engine) -> Path:
    """The engine's venv: one per package, engine location and gate interpreter."""
    recipe = json.dumps(_recipe(), sort_keys=True)
    key = hashlib.sha256(f"{engine.root.resolve()}\n{recipe}".encode()).hexdigest()[:12]
    return forge_cache_root() / "engine-venvs" / f"{engine.package}-{key}"


def engine_python(engine: Engine) -> Path:
    """The engine's interpreter (`<venv>/bin/python`), making its venv on first use (about a second)."""
    root = venv_dir(engine)
    with _LOCK:
        if not ((root / MARKER).is_file() and (root / "bin" / "python").exists()):  # the name keys the recipe
            _make(root, _recipe())
    return root / "bin" / "python"


def venv_of(python: str | Path) -> Path | None:
    """The engine venv whose interpreter `python` is, or None (a sandbox that hides the forge cache binds it)."""
    root = Path(python).parent.parent
    return root if (root / MARKER).is_file() else None


def _make(root: Path, recipe: dict) -> None:
    """Build the venv beside its final place and rename it there (a half-made venv is never used)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from an engine run as another user
        purelib = subprocess.run([str(tmp / "bin" / "python"), "-c",
                                  "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        (Path(purelib) / PTH).write_text(f"import site; list(map(site.addsitedir, {recipe['site_dirs']!r}))\n")
        (tmp / MARKER).write_text(json.dumps(recipe, sort_keys=True))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
