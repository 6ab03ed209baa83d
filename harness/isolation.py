"""Rounds in a sandbox: what an agent's processes see (a CLI agent, a shell agent, an API backend's tool
commands, a timing command), built on the gates' bubblewrap primitive (gates/sandbox.py: View, isolation).

Inside, a round's process:
- sees / read-only, with /tmp, HOME and the forge cache fresh and empty, and /run, /var/tmp, /home, /root,
  the run's state (all of <git>/forge) and the engine repository's own checkout hidden; the workspace (the
  gate runner the prompt tells it to use), the interpreter, the PATH's tool dirs, the repository's .git and
  the spec's `share` paths shown read-only;
- writes only its worktree, the worktree's own git admin dir, a private object dir for its commits (the
  repository's objects are an alternate: read-only) and its outbox (e.g. the shell agent's usage file);
- has its own PID namespace and /proc (forge and its environment are invisible), loopback-only network
  (a CLI agent reaches its service through harness/egress.py only), no capabilities; it dies with forge.
The harness never runs git with the worktree's own `.git` after the agent ran (harness/workspace.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gates.launch import WORKSPACE, forge_cache_root
from gates.sandbox import INSTALL_HINT, Isolation, View, interpreter_dirs, isolation, view_argv
from harness import egress

SandboxMode = Literal["required", "preferred", "off"]
OBJECTS_INSIDE = Path("/tmp/forge-git-objects")  # the agent's own commits land here, in its private /tmp


class SandboxUnavailable(RuntimeError):
    """`sandbox = "required"` on a machine where bubblewrap cannot run."""


def round_isolation(mode: SandboxMode) -> Isolation:
    """The isolation rounds get under `mode`; SandboxUnavailable when it is required and missing."""
    if mode == "off":
        return Isolation("none", reason='[agent] sandbox = "off"')
    iso = isolation(mode)
    if iso.method == "none" and mode == "required":
        raise SandboxUnavailable(f"the round sandbox is required but unavailable ({iso.reason}): {INSTALL_HINT}; "
                                 "or set [agent] sandbox = \"preferred\"")
    return iso


def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


@dataclass
class RoundBox:
    """The sandbox of one round's processes (or none: `iso.method == "none"`, with the reason)."""

    iso: Isolation
    worktree: Path
    git_common: Path                      # the repository's .git (objects, refs, config): read-only
    git_admin: Path | None                # .git/worktrees/<name>: the worktree's HEAD and index
    out_dir: Path                         # the agent's outbox
    hidden: tuple[Path, ...] = ()         # the run's state dir, the repository's checkout
    shown: tuple[Path, ...] = ()          # the spec's share paths, the prompt file
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def sandboxed(self) -> bool:
        return self.iso.method == "bwrap"

    def describe(self) -> str:
        return "bwrap" if self.sandboxed else f"none ({self.iso.reason})"

    def wrap(self, argv: list[str], env: dict[str, str], *, worktree_rw: bool = True, writable: tuple[Path, ...] = (),
             read_only: tuple[Path, ...] = (), egress_dir: Path | None = None,
             cwd: Path | None = None) -> tuple[list[str], dict[str, str]]:
        """(argv, env) that run `argv` in this round's sandbox (in `cwd`, default the worktree); unchanged when
        there is none. `egress_dir`: the egress proxy's socket dir (the command then runs behind the bridge,
        with proxy variables)."""
        if not self.sandboxed:
            return argv, env
        home = Path(env.get("HOME") or Path.home())
        scratch = (Path("/tmp"), Path(tempfile.gettempdir()), home, forge_cache_root())  # the agent's gate runs cache here
        hidden = [Path(p) for p in ("/run", "/var/run", "/var/tmp", "/home", "/root")]
        hidden += [self.git_common / "forge", WORKSPACE / ".git" / "forge", *self.hidden]
        hidden = [p for p in hidden if p.resolve() not in {s.resolve() for s in scratch}]
        covered = [*scratch, *hidden]
        path_dirs = [Path(d) for d in env.get("PATH", "").split(os.pathsep) if d]
        shown = [p for p in [*interpreter_dirs(), *path_dirs] if any(_inside(p.resolve(), c.resolve()) for c in covered)]
        shown += [WORKSPACE, self.git_common, *self.shown, *read_only]
        rw = [self.out_dir, *writable]
        if worktree_rw:
            rw += [self.worktree] + ([self.git_admin] if self.git_admin else [])
        else:
            shown.append(self.worktree)
        files: list[tuple[Path, Path]] = []
        env = env | {"TMPDIR": "/tmp", "HOME": str(home), "GIT_OBJECT_DIRECTORY": str(OBJECTS_INSIDE),
                     "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(self.git_common / "objects")} | self.extra_env
        if egress_dir is not None:
            files += [(egress.BRIDGE, egress.BRIDGE_INSIDE), (egress_dir, egress.SOCKET_DIR_INSIDE)]
            argv = [sys.executable, str(egress.BRIDGE_INSIDE), str(egress.PORT),
                    str(egress.SOCKET_DIR_INSIDE / "proxy.sock"), "--", *argv]
            env |= egress.proxy_env()
        view = View(scratch=scratch, hidden=tuple(hidden), read_only=tuple(shown), writable=tuple(rw),
                    files=tuple(files), dirs=(OBJECTS_INSIDE,), cwd=cwd or self.worktree)
        return view_argv(self.iso, view, argv), env


def unsandboxed(worktree: Path, out_dir: Path, reason: str = "no sandbox") -> RoundBox:
    """A box that runs commands as they are (tests of the backends alone, `sandbox = "off"`)."""
    return RoundBox(Isolation("none", reason=reason), worktree, worktree / ".git", None, out_dir)
