"""Engine isolation: the sandbox every engine command runs in, and the integrity tripwire around it.

Under bubblewrap (isolation method `bwrap`) an engine command:
- sees / read-only: it cannot write the interpreter, its site-packages (no `.pth` hook) or the workspace;
- runs on its own venv's python (gates/engine_venv.py), bound back read-only;
- sees the workspace, HOME, /tmp, /run, the gate's temp dir, the forge cache and the reference cache as
  empty tmpfs's (so `import gates` fails and no credential file or reference output is there to read); the
  interpreter and the engine's own tree are bound back read-only;
- writes only its sandbox directory (its outputs; the case in it is bound read-only) and its private compile cache;
- has its own PID namespace and /proc (no other process, hence no other environment, is visible; every
  process left when the command ends is killed), a network namespace with loopback only, no capabilities
  and no nested user namespaces (so the mounts above cannot be undone from inside).
Why bubblewrap: one small, widely packaged binary that sets all of this up in one exec, as root or not;
`unshare(1)` alone would need a mount script of our own to get the same.

Tripwire: a content hash of the reference tree and a stat fingerprint of the interpreter's site-packages,
taken before and after every engine command; any change fails the gate. It catches tampering when the
sandbox is off, and a hole in the sandbox when it is on.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

from gates.context import GateStop
from gates.engine_venv import venv_dir
from gates.launch import (WORKSPACE, Engine, Proc, Sandbox, engine_cache_dir, engine_cache_env, forge_cache_root,
                          reference_tree, run_process)
from gates.report import Localization

if TYPE_CHECKING:
    from gates.context import GateRun

SandboxMode = Literal["required", "preferred", "off"]
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) or pass --sandbox preferred "
                "to run engines unsandboxed")
GUARANTEES = [
    "/ read-only: interpreter, site-packages and workspace unwritable",
    "workspace, HOME, /tmp, /run, forge and reference caches hidden (empty tmpfs)",
    "writable: the command's sandbox directory (its case read-only) and the engine's compile cache only",
    "the engine's own venv (read-only), never the reference's interpreter prefix",
    "own PID namespace and /proc: no other process or environment visible; all killed when the command ends",
    "no network: loopback only",
    "no capabilities, no nested user namespaces",
]
# Namespaces, capabilities and lifetime. `--unshare-user --disable-userns` needs bwrap >= 0.8; without it the
# mounts still cannot be undone (they are locked in any nested user namespace), so older bwraps run without.
_NS_FLAGS = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--die-with-parent", "--new-session",
             "--cap-drop", "ALL"]
_NO_USERNS = ["--unshare-user", "--disable-userns"]


@dataclass(frozen=True)
class Isolation:
    """How engine commands run: `bwrap` (with the flags this bwrap accepts) or `none` (and why)."""

    method: Literal["bwrap", "none"]
    reason: str = ""
    bwrap: str = ""
    flags: tuple[str, ...] = ()

    def as_report(self) -> dict[str, str | list[str]]:
        if self.method == "none":
            return {"method": "none", "reason": self.reason}
        guarantees = GUARANTEES if "--disable-userns" in self.flags else GUARANTEES[:-1] + ["no capabilities"]
        return {"method": "bwrap", "guarantees": list(guarantees)}


def find_bwrap() -> str | None:
    """The bwrap binary (tests monkeypatch this to simulate a machine without it)."""
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=None)
def _usable_flags(bwrap: str) -> tuple[tuple[str, ...] | None, str]:
    """The namespace flags this bwrap can apply here, or None and why not (a kernel or container may refuse
    user namespaces). Tried once per process."""
    last = ""
    for flags in (_NS_FLAGS + _NO_USERNS, _NS_FLAGS):
        argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *flags, "--", "true"]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{bwrap} could not run: {e}"
        if p.returncode == 0:
            return tuple(flags), ""
        last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return None, f"{bwrap} cannot create its namespaces here: {last}"


def isolation(mode: SandboxMode) -> Isolation:
    """What engine commands get under `mode` (GateOptions.sandbox) on this machine."""
    if mode == "off":
        return Isolation("none", reason="sandbox off (GateOptions.sandbox / --sandbox off)")
    bwrap = find_bwrap()
    if bwrap is None:
        return Isolation("none", reason="bwrap (bubblewrap) not found on PATH")
    flags, why = _usable_flags(bwrap)
    if flags is None:
        return Isolation("none", reason=why)
    return Isolation("bwrap", bwrap=bwrap, flags=flags)


# ----- what the sandbox shows ----------------------------------------------------------------------------
def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def _existing_dirs(paths: list[Path]) -> list[Path]:
    """Resolved directories that exist, without repeats."""
    return [p for p in _existing_paths(paths) if p.is_dir()]


def interpreter_dirs() -> list[Path]:
    """The interpreter's prefixes and package directories (bound back read-only when under a hidden path)."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable),
             os.path.dirname(os.path.realpath(sys.executable)), *site.getsitepackages(), site.getusersitepackages(),
             *sysconfig.get_paths().values()]
    return _existing_dirs([Path(p) for p in paths if p])


def engine_view(engine: Engine) -> list[Path]:
    """What of the engine's tree it reads: its root; for an engine inside this workspace, the folder holding
    it (sibling engines: the red-team variants share `base`), never the workspace root, gates/ or harness/."""
    root = engine.root.resolve()
    parent = root.parent
    reference = [WORKSPACE / "gates", WORKSPACE / "harness"]
    if parent != WORKSPACE and _inside(parent, WORKSPACE) and not any(_inside(parent, r) for r in reference):
        return [parent]
    return [root]


def _dev_binds() -> list[str]:
    """NVIDIA device nodes (GPU machines), on top of bwrap's minimal /dev."""
    out: list[str] = []
    for node in sorted(glob.glob("/dev/nvidia*")):
        out += ["--dev-bind", node, node]
    return out


def _outermost(paths: list[Path]) -> list[Path]:
    return [p for p in paths if not any(q != p and _inside(p, q) for q in paths)]


def bwrap_argv(iso: Isolation, argv: list[str], box: Path, engine: Engine, cache: Path,
               reference_cache: Path | None, case: tuple[Path, Path] | None = None) -> list[str]:
    """`argv` wrapped in bwrap: / read-only; scratch paths (/tmp, the temp dir, HOME) as fresh writable
    tmpfs's and secret ones (workspace, /run, caches) as empty read-only ones; the interpreter, the engine's
    tree and its venv bound back read-only; `box` and `cache` writable; cwd `box`; `case` (source, mount point
    inside `box`) bound read-only."""
    home = Path.home().resolve()
    scratch = _existing_dirs([Path("/tmp"), Path(tempfile.gettempdir())] + ([home] if home != Path("/") else []))
    empty = _existing_dirs([Path("/var/tmp"), Path("/run"), Path("/var/run"), WORKSPACE, forge_cache_root()]
                           + ([reference_cache] if reference_cache is not None else []))
    empty = [p for p in empty if p not in scratch]
    hidden = _outermost(scratch + empty)
    out = [iso.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", *_dev_binds(), "--proc", "/proc"]
    for p in hidden:
        out += ["--tmpfs", str(p)]
    if home in scratch:
        out += ["--dir", str(home)]  # a fresh HOME, also when it lies inside another scratch path
    shown = [p for p in interpreter_dirs() if any(_inside(p, h) for h in hidden)]
    own = [p for p in [*engine_view(engine), *_existing_dirs([venv_dir(engine)])] if p not in shown]
    shown = _outermost(shown + own)
    for p in shown:
        out += ["--ro-bind", str(p), str(p)]
    rehidden = [p for p in empty if any(_inside(p, s) for s in shown)]  # secrets inside a bound-back tree
    for p in rehidden:
        out += ["--tmpfs", str(p)]
    box, cache = box.resolve(), cache.resolve()
    out += ["--bind", str(box), str(box), "--bind", str(cache), str(cache)]
    if case is not None:
        out += ["--ro-bind", str(case[0]), str(case[1].resolve())]
    for p in empty:
        if p in hidden or p in rehidden:
            out += ["--remount-ro", str(p)]
    env_home = str(home) if home in scratch else "/tmp"
    out += ["--chdir", str(box), "--setenv", "HOME", env_home, "--setenv", "TMPDIR", "/tmp",
            "--setenv", "GLOO_SOCKET_IFNAME", "lo", *iso.flags, "--", *argv]
    return out


# ----- integrity tripwire -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Watched:
    """What the tripwire fingerprints: trees whose .py files are content-hashed, and directories whose every
    entry is fingerprinted by stat (a missing one too: creating it is a change)."""

    reference: tuple[Path, ...]
    interpreter: tuple[Path, ...]


def watched_paths() -> Watched:
    """The gates/ the reference runs from (gates/launch.py reference_tree: the reference stacks and the gate
    code) and the interpreter's site-packages (system and user). Tests monkeypatch this to point at fakes."""
    sp = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
          sysconfig.get_paths()["platlib"]]
    seen: list[Path] = []
    for p in sp:
        r = Path(p).resolve()
        if r not in seen:
            seen.append(r)
    return Watched(reference=(reference_tree() / "gates",), interpreter=tuple(seen))


Fingerprint = dict[str, str]


def _hash(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        return f"unreadable {e.errno}"
    return h.hexdigest()


def _walk(root: str):
    """(path, lstat) of every entry under root, without following links."""
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            yield e.path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)


def fingerprint(w: Watched) -> Fingerprint:
    """Reference trees: sha256 of each .py file. Interpreter dirs: type, size, mtime and ctime of every file and
    link (ctime catches an mtime put back), plus the content hash of each .pth file; directories by presence
    only (an entry added or removed inside one shows as that entry)."""
    fp: Fingerprint = {}
    for tree in w.reference:
        fp[str(tree)] = "dir" if tree.is_dir() else "absent"
        for path, st in _walk(str(tree)):
            if path.endswith(".py") and stat.S_ISREG(st.st_mode):
                fp[path] = _hash(path)
    for d in w.interpreter:
        fp[str(d)] = "dir" if d.is_dir() else "absent"
        for path, st in _walk(str(d)):
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
            fp[path] = "d" if kind == "d" else f"{kind} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"
            if path.endswith(".pth") and kind == "f":
                fp[path] += " " + _hash(path)
    return fp


def changes(before: Fingerprint, after: Fingerprint) -> list[str]:
    """What differs, one entry a path: `added P`, `removed P`, `changed P`."""
    out = []
    for p in sorted(set(before) | set(after)):
        b, a = before.get(p), after.get(p)
        if b == a:
            continue
        out.append(f"{'added' if b is None or b == 'absent' else 'removed' if a is None or a == 'absent' else 'changed'} {p}")
    return out


def tampering(before: Fingerprint, after: Fingerprint) -> list[str]:
    """`changes` less Python's own bytecode caching: a `__pycache__` directory, and a .pyc in one that is the
    faithful compile of its source (any process importing a module for the first time writes one)."""
    return [c for c in changes(before, after) if not _bytecode_cache(c.split(" ", 1)[1], c.startswith("removed"))]


def _bytecode_cache(path: str, removed: bool) -> bool:
    p = Path(path)
    if p.name == "__pycache__":
        return True
    if p.parent.name != "__pycache__" or p.suffix != ".pyc":
        return False
    return removed or _faithful_pyc(p)


def _faithful_pyc(pyc: Path) -> bool:
    """True when `pyc` holds exactly the code its source compiles to (code objects compare by value)."""
    import importlib.util
    import marshal

    try:
        src = Path(importlib.util.source_from_cache(str(pyc)))
        data = pyc.read_bytes()
        if data[:4] != importlib.util.MAGIC_NUMBER or stat.S_ISLNK(pyc.lstat().st_mode):
            return False
        return marshal.loads(data[16:]) == compile(src.read_bytes(), str(src), "exec", dont_inherit=True)
    except (OSError, ValueError, EOFError, TypeError, SyntaxError):
        return False


def box_escapes(box: Path) -> list[str]:
    """Entries the engine left in its sandbox that would lead the gate's reads elsewhere: a symlink out of
    the box, or anything that is not a file, directory or symlink (a FIFO would hang the gate's read)."""
    root = box.resolve()
    bad = []
    for path, st in _walk(str(root)):
        if stat.S_ISLNK(st.st_mode):
            target = Path(path).resolve()
            if not _inside(target, root):
                bad.append(f"{path} -> {target}")
        elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            bad.append(f"{path} (not a regular file)")
    return bad


def _listed(items: list[str], n: int = 6) -> str:
    return "; ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# ----- one engine command -----------------------------------------------------------------------------------
def sandboxed_argv(g: GateRun, argv: list[str], box: Path, case: Sandbox | None = None) -> list[str]:
    """`argv` as the sandbox runs it in `box`, per `g.options.sandbox` (the isolation goes into the report);
    `case`: the Sandbox whose `case/` the command reads (bound read-only, or copied when unsandboxed).
    For a caller that drives the process itself; `run_engine_command` is the usual way. GateStop (`error`,
    sandbox) when a required sandbox is unavailable."""
    mode = g.options.sandbox
    iso = isolation(mode)
    g.report.isolation = iso.as_report()
    if iso.method == "none" and mode == "required":
        raise GateStop("error", f"engine sandbox required but unavailable ({iso.reason}): {INSTALL_HINT}", "sandbox")
    cache = engine_cache_dir(g.engine)
    for d in (cache, *map(Path, engine_cache_env(g.engine).values())):
        d.mkdir(parents=True, exist_ok=True)
    if iso.method == "none":
        if case is not None:
            case.copy_case()
        return argv
    bind = (case.case_source, case.case) if case is not None and case.case_source is not None else None
    return bwrap_argv(iso, argv, box, g.engine, cache, g.options.reference_cache, bind)


def verify_untouched(g: GateRun, role: str, before: Fingerprint, box: Path, proc: Proc | None = None) -> None:
    """After an engine command: GateStop (`failed`) when it changed a watched file (`before`: the fingerprint
    taken just before it) or left an entry in `box` that leads outside it. `proc` is recorded first."""
    changed = tampering(before, fingerprint(watched_paths()))
    escapes = box_escapes(box)
    if not (changed or escapes):
        return
    if proc is not None:
        try:
            g._record(role, proc)
        except Exception:  # noqa: BLE001 - a timeout too: the tampering is the verdict
            pass
    if changed:
        what = f"the reference tree or the interpreter changed while {role} ran (tampering): {_listed(changed)}"
    else:
        what = f"{role} left entries in its sandbox that lead outside it: {_listed(escapes)}"
    g.report.artifacts["tampering"] = "\n".join(changed + escapes)[:8000]
    raise GateStop("failed", what, localization=Localization(what=what))


def run_engine_command(g: GateRun, argv: list[str], box: Sandbox, env_set: dict[str, str], role: str) -> Proc:
    """One engine command, sandboxed per `g.options.sandbox`, with the tripwire around it. The returned Proc
    (the caller records it) names the engine's argv; the report's `isolation` says what wrapped it."""
    full = sandboxed_argv(g, argv, box.root, box)
    before = fingerprint(watched_paths())
    proc = replace(run_process(full, box.root, env_set, g.deadline), argv=argv)
    verify_untouched(g, role, before, box.root, proc)
    return proc


# ----- a general view (the harness's round sandbox builds on this) ----------------------------------------
@dataclass(frozen=True)
class View:
    """What a sandboxed command sees besides / read-only, a minimal /dev (plus the GPUs) and its own /proc.
    Every path keeps its host path inside; deeper paths are mounted after shallower ones, so a writable
    worktree can sit inside a hidden state dir inside a read-only .git."""

    scratch: tuple[Path, ...] = ()                # fresh writable tmpfs's (/tmp, HOME)
    hidden: tuple[Path, ...] = ()                 # empty tmpfs's, read-only once the binds inside are made
    read_only: tuple[Path, ...] = ()              # host paths bound back read-only
    writable: tuple[Path, ...] = ()               # host paths bound read-write
    files: tuple[tuple[Path, Path], ...] = ()     # (host file or dir, path inside) bound read-only
    dirs: tuple[Path, ...] = ()                   # empty directories created inside a scratch tmpfs
    cwd: Path | None = None


def view_argv(iso: Isolation, view: View, argv: list[str]) -> list[str]:
    """`argv` wrapped in bwrap showing `view`, with `iso`'s namespace flags (own PID namespace and /proc,
    loopback-only network, no capabilities, killed with its parent)."""
    order = {"tmpfs": 0, "ro": 1, "file": 1, "rw": 2, "dir": 3}
    mounts: list[tuple[str, Path, Path]] = []
    mounts += [("tmpfs", p, p) for p in _existing_dirs([*view.scratch, *view.hidden])]
    mounts += [("ro", p, p) for p in _existing_paths(view.read_only)]
    mounts += [("rw", p, p) for p in _existing_paths(view.writable)]
    mounts += [("file", src.resolve(), dst) for src, dst in view.files if src.exists()]
    mounts += [("dir", p, p) for p in view.dirs]
    mounts.sort(key=lambda m: (len(m[2].parts), order[m[0]]))
    flag = {"ro": "--ro-bind", "file": "--ro-bind", "rw": "--bind", "dir": "--dir", "tmpfs": "--tmpfs"}
    out = [iso.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", *_dev_binds(), "--proc", "/proc"]
    for kind, src, dst in mounts:
        out += [flag[kind], str(dst)] if kind in ("tmpfs", "dir") else [flag[kind], str(src), str(dst)]
    for p in _existing_dirs(list(view.hidden)):
        out += ["--remount-ro", str(p)]
    if view.cwd is not None:
        out += ["--chdir", str(view.cwd)]
    return out + [*iso.flags, "--", *argv]


def _existing_paths(paths: Iterable[Path]) -> list[Path]:
    """Resolved paths that exist (files too), without repeats."""
    out: list[Path] = []
    for p in paths:
        try:
            r = p.resolve()
        except OSError:
            continue
        if r.exists() and r not in out:
            out.append(r)
    return out
