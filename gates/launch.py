"""How gates start stacks: engine discovery, isolated sandboxes, subprocesses under a deadline.

Engine: a directory ENGINE with exactly one package `ENGINE/src/<pkg>/` holding `__main__.py`. It runs
as `python -m <pkg> ...` (under torchrun for more than one process), `python` being the engine's own venv's
(gates/engine_venv.py), with PYTHONPATH=ENGINE/src and
nothing else from the gate's environment on PYTHONPATH, in a fresh temporary directory that holds
only the case (read-only; a copy when unsandboxed) and the output directory, inside the bubblewrap sandbox of gates/sandbox.py
(read-only /, the workspace hidden, own PID and network namespaces; GateOptions.sandbox says whether
running without one is allowed, the report's `isolation` says which it was). The engine always runs
before the reference on a case, and reference outputs are deleted once compared, so no reference
output of the case exists anywhere while the engine runs (a guessed path finds nothing). Its compile
caches (Triton, Inductor, CUDA, XDG) live in a persistent directory of its own (`engine_cache_dir`),
so they stay warm across the gate's commands; the reference never reads it.

Reference: the argv of `gates.stacks.STACKS[name]`, with PYTHONPATH = `reference_tree()`, a private copy
of this workspace's gates/ taken once per gate process (gate code always comes from here, never from the
engine; edits to the working tree during a run change nothing), in its own temporary directory, outside the
sandbox: the engine can neither see nor write that copy (gates/sandbox.py fingerprints it around every
engine command).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

WORKSPACE = Path(__file__).resolve().parent.parent
TAIL_CHARS = 4000
# Variables that would put the gate's (or anyone's) code on the engine's import path.
_SCRUB = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "PYTHONUSERBASE")
# Engines are agent-written code: API keys and other credentials never reach them.
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL|AUTH)", re.IGNORECASE)


class EngineLayoutError(ValueError):
    """ENGINE is not a directory with exactly one src/<pkg>/__main__.py."""


class GateTimeout(Exception):
    """The gate's wall-clock budget ran out (the runner turns it into verdict `error`, timeout)."""


@dataclass(frozen=True)
class Engine:
    root: Path
    package: str

    @property
    def src(self) -> Path:
        return self.root / "src"


def discover_engine(path: str | Path) -> Engine:
    root = Path(path).resolve()
    src = root / "src"
    if not src.is_dir():
        raise EngineLayoutError(f"engine {root}: no src/ directory (expected src/<pkg>/__main__.py)")
    pkgs = sorted(p.name for p in src.iterdir() if p.is_dir() and (p / "__main__.py").is_file())
    if len(pkgs) != 1:
        raise EngineLayoutError(f"engine {root}: expected exactly one src/<pkg>/__main__.py, found {pkgs or 'none'}")
    return Engine(root, pkgs[0])


class Deadline:
    """The gate's remaining wall-clock budget."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.total = seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise GateTimeout(f"gate budget of {self.total:.0f}s exhausted")
        return left


@dataclass
class Proc:
    argv: list[str]
    cwd: Path
    env_set: dict[str, str]
    rc: int | None
    time_s: float
    timed_out: bool
    stdout: str
    stderr: str


def _tail(path: Path) -> str:
    data = path.read_bytes()[-TAIL_CHARS:] if path.exists() else b""
    return data.decode("utf-8", "replace")


def run_process(argv: list[str], cwd: Path, env_set: dict[str, str], deadline: Deadline, scrub: bool = True) -> Proc:
    """Run `argv` in its own process group; on deadline kill the whole group. Never raises on a
    timeout: `Proc.timed_out` says so (the caller decides)."""
    env = {k: v for k, v in os.environ.items() if not (scrub and (k in _SCRUB or _SECRET_NAME.search(k)))}
    env.update(env_set)
    logs = Path(tempfile.mkdtemp(prefix="forge-gate-log-"))
    t0 = time.monotonic()
    timed_out = False
    try:
        with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
            p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
            try:
                rc: int | None = p.wait(timeout=max(0.1, deadline.end - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(p)
                rc = None
            except BaseException:  # the gate itself is interrupted: the command's whole group ends with it
                _kill_group(p)
                raise
        return Proc(argv, cwd, env_set, rc, time.monotonic() - t0, timed_out, _tail(logs / "out"), _tail(logs / "err"))
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def engine_argv(engine: Engine, args: list[str], nproc: int = 1) -> list[str]:
    """`python -m <pkg> ARGS`, or torchrun's `--standalone --nproc-per-node N -m <pkg> ARGS` (torchrun is
    the console name of `torch.distributed.run`; running it as a module pins the same interpreter), with the
    engine's own venv's python (gates/engine_venv.py)."""
    from gates.engine_venv import engine_python  # it builds on this module's Engine and cache root

    python = str(engine_python(engine))
    if nproc == 1:
        return [python, "-m", engine.package, *args]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", engine.package, *args]


def forge_cache_root() -> Path:
    """FORGE_CACHE_DIR, default ~/.cache/forge (gates/data/default.py keeps the tokenizer there too)."""
    return Path(os.environ.get("FORGE_CACHE_DIR", Path.home() / ".cache" / "forge")).expanduser().resolve()


def _location_key(root: Path) -> str:
    return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


def engine_cache_dir(engine: Engine) -> Path:
    """The engine's own persistent cache directory: one per package and engine location."""
    return forge_cache_root() / "engine-cache" / f"{engine.package}-{_location_key(engine.root)}"


def save_engine_cache(engine: Engine, to: Path) -> None:
    """`to` becomes a copy of the engine's compile caches (nothing when it has none): a seed for another location of
    the same code."""
    shutil.rmtree(to, ignore_errors=True)
    if engine_cache_dir(engine).is_dir():
        shutil.copytree(engine_cache_dir(engine), to, symlinks=True)


def seed_engine_cache(engine: Engine, seed: Path) -> None:
    """The engine's compile caches start as a copy of `seed` (when it exists). Triton, Inductor and the CuTeDSL
    libraries key their entries by content, so only what this copy of the code changes compiles anew."""
    if seed.is_dir():
        shutil.rmtree(engine_cache_dir(engine), ignore_errors=True)
        shutil.copytree(seed, engine_cache_dir(engine), symlinks=True)


def remove_engine_caches(root: Path) -> list[Path]:
    """Delete the compile caches of the engine at `root` (any package), when that location is gone for good (the
    loop's round worktrees: one cache each, hundreds of MB on a GPU); returns what was removed."""
    gone = sorted((forge_cache_root() / "engine-cache").glob(f"*-{_location_key(root)}"))
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


def engine_cache_env(engine: Engine) -> dict[str, str]:
    """Compile caches under `engine_cache_dir`: warm caches across commands keep GPU timings comparable.
    CuTeDSL libraries (quack, FA4) default their kernel caches to /tmp, which the sandbox makes fresh per command."""
    d = engine_cache_dir(engine)
    return {"TRITON_CACHE_DIR": str(d / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(d / "inductor"),
            "XDG_CACHE_HOME": str(d / "xdg"), "CUDA_CACHE_PATH": str(d / "cuda"),
            "QUACK_CACHE_DIR": str(d / "quack"), "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(d / "flash_attn_cute")}


def engine_env(engine: Engine) -> dict[str, str]:
    return {"PYTHONPATH": str(engine.src), "PYTHONDONTWRITEBYTECODE": "1", **engine_cache_env(engine)}


def reference_env() -> dict[str, str]:
    return {"PYTHONPATH": str(reference_tree()), "PYTHONDONTWRITEBYTECODE": "1"}


_TREE: list[Path] = []  # the one reference tree of this process, once made
_TREE_LOCK = threading.Lock()  # gate runs in threads (the red-team session) must all get the same tree


def reference_tree() -> Path:
    """A read-only copy of the workspace's gates/ under a fresh temporary directory, made on first use and
    removed at exit: the reference stacks run from it, and the tripwire hashes it."""
    with _TREE_LOCK:
        if _TREE:
            return _TREE[0]
        root = Path(tempfile.mkdtemp(prefix="forge-reference-"))
        shutil.copytree(WORKSPACE / "gates", root / "gates", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for d, _, files in os.walk(root / "gates"):
            for f in files:
                os.chmod(os.path.join(d, f), 0o444)
        atexit.register(_remove_tree, root)
        _TREE.append(root)
        return root


@functools.cache
def reference_code_hash() -> str:
    """sha256 over the reference tree's files (paths and bytes): part of every reference-cache key, so a
    changed reference never answers from a cache its older code wrote."""
    h = hashlib.sha256()
    root = reference_tree()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _remove_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    shutil.rmtree(root, ignore_errors=True)


class Sandbox:
    """A fresh temporary directory holding only `case/` (absent for None) and, after the run, `out/`. `case/` shows
    `case_dir` read-only: bubblewrap binds it there for each command (gates/sandbox.py), an unsandboxed command
    gets a copy made before it (`copy_case`), so what it changes there is its copy only."""

    def __init__(self, case_dir: Path | None, prefix: str = "forge-engine-"):
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.case = self.root / "case"
        self.case_source = Path(case_dir).resolve() if case_dir is not None else None
        if self.case_source is not None:
            self.case.mkdir()
        self.out = self.root / "out"

    def copy_case(self) -> None:
        """Fill `case/` with a copy of the case for a command that runs without the read-only bind."""
        if self.case_source is not None:
            shutil.rmtree(self.case, ignore_errors=True)
            shutil.copytree(self.case_source, self.case)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
