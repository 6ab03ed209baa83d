"""Rounds in isolation: one git worktree per round, a path check, commits by plumbing (gitpython).

The export lives in a git repository (the workspace itself, or a scratch copy whose root is the export).
A forge run owns one branch, `forge/<spec>-<run id>`. Each round:

1. `create_round`: a fresh worktree, detached at the branch tip, under the run's state dir;
2. the agent edits it (it may even commit: only the final files count);
3. `snapshot`: the worktree's files (untracked included, .gitignore and build junk excluded) become a
   git tree through a temporary index and a quarantine object dir, so the worktree's own index, HEAD and
   `.git` (the agent could point it at a config of its own) are never trusted: every git command on a
   round names the repository's git dir itself. A changed file that holds a secret is redacted in place
   before anything reaches the repository's objects (the round is then rejected);
4. `check`: every changed path must lie under the engine and match the spec's allowed globs, symlinks
   must stay inside the engine, and the harness's own files (manifest.json, forge/) are off limits;
5. on a pass, `commit` writes commit objects from the snapshot (`commit-tree`) and `advance` moves the
   branch with a compare-and-swap `update-ref`; `land` fast-forwards the checked-out branch when it can.

Nothing here touches the main checkout's index, HEAD or files, except `land`'s `merge --ff-only`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import git

from harness.secrets import holds_secret, redact, redact_bytes, redact_file

HARNESS_OWNED = ("manifest.json", "forge/**")   # relative to the engine dir: written by the harness only
JUNK = ("__pycache__/", "*.pyc", ".pytest_cache/", "*.egg-info/", ".ipynb_checkpoints/")
IDENTITY = {"GIT_AUTHOR_NAME": "forge", "GIT_AUTHOR_EMAIL": "forge@localhost",
            "GIT_COMMITTER_NAME": "forge", "GIT_COMMITTER_EMAIL": "forge@localhost"}
# Nothing an agent wrote may run inside the harness's git: no hooks, no fsmonitor command.
SAFE = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")


class WorkspaceError(RuntimeError):
    """The export is not in a git repository, or the forge branch moved under us."""


def glob_regex(pattern: str) -> re.Pattern[str]:
    """`**` any path (including /), `*` and `?` within one path component."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def matches(path: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(glob_regex(p).match(path) for p in patterns)


@dataclass
class Change:
    path: str          # relative to the repository root
    status: str        # A, M, D, T
    mode: str          # new mode ("000000" when deleted)
    target: str | None = None  # symlink target


@dataclass
class Snapshot:
    tree: str
    changes: list[Change]
    insertions: int = 0
    deletions: int = 0
    secrets: list[str] = field(default_factory=list)  # changed paths that held a secret (redacted in place)

    @property
    def paths(self) -> list[str]:
        return [c.path for c in self.changes]

    def stat(self) -> dict[str, int]:
        return {"files": len(self.changes), "insertions": self.insertions, "deletions": self.deletions}


@dataclass
class RoundTree:
    name: str
    path: Path          # worktree root
    base: str           # commit the worktree started from
    engine_dir: Path    # the export inside the worktree
    git_admin: Path | None = None  # .git/worktrees/<name>: the worktree's own HEAD and index
    extra: dict = field(default_factory=dict)


class Workspace:
    """The repository holding the export, and the forge branch of one run."""

    def __init__(self, engine: Path, branch: str, worktrees_dir: Path) -> None:
        engine = Path(engine).resolve()
        try:
            self.repo = git.Repo(engine, search_parent_directories=True)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise WorkspaceError(f"{engine} is not inside a git repository") from None
        self.root = Path(self.repo.working_tree_dir).resolve()
        common = Path(self.repo.git.rev_parse("--git-common-dir"))
        self.git_common = (common if common.is_absolute() else self.root / common).resolve()
        self.engine_rel = engine.relative_to(self.root).as_posix()
        self.branch = branch
        self.ref = f"refs/heads/{branch}"
        self.worktrees_dir = worktrees_dir
        self._junk = worktrees_dir.parent / "forge-excludes"

    # -- the branch ---------------------------------------------------------------------------------
    def _git(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
        g = git.Git(str(cwd or self.root))
        return g.execute(["git", *SAFE, *args], env={**IDENTITY, **(env or {})}, strip_newline_in_stdout=True)

    def _round_git(self, rt: RoundTree, *args: str, env: dict[str, str] | None = None) -> str:
        """git on a round's files, with the repository's own git dir named: the worktree's `.git` is not read."""
        return self._git(*args, cwd=rt.path, env={"GIT_DIR": str(self.git_common), "GIT_WORK_TREE": str(rt.path),
                                                  **(env or {})})

    def branch_tip(self) -> str | None:
        try:
            return self._git("rev-parse", "--verify", "-q", self.ref + "^{commit}")
        except git.GitCommandError:
            return None

    def ensure_branch(self, start: str = "HEAD") -> str:
        tip = self.branch_tip()
        if tip is None:
            sha = self._git("rev-parse", start + "^{commit}")
            self._git("update-ref", self.ref, sha, "")
            tip = sha
        return tip

    def advance(self, new: str, old: str) -> None:
        """Move the forge branch from `old` to `new`, failing if someone else moved it."""
        try:
            self._git("update-ref", "-m", "forge: round passed", self.ref, new, old)
        except git.GitCommandError as e:
            raise WorkspaceError(f"forge branch {self.branch} moved under the run: {e.stderr.strip()}") from None

    def force_branch(self, sha: str) -> None:
        """Resume: point the branch at the commit the ledger says passed last."""
        self._git("update-ref", "-m", "forge: resume", self.ref, sha)

    def tree_of(self, commit: str) -> str:
        return self._git("rev-parse", f"{commit}^{{tree}}")

    def is_ancestor(self, a: str, b: str) -> bool:
        try:
            self._git("merge-base", "--is-ancestor", a, b)
            return True
        except git.GitCommandError:
            return False

    def land(self) -> tuple[bool, str]:
        """Fast-forward the main checkout's branch to the forge branch, when it is checked out, behind it,
        and the merge touches no local change. Returns (landed, why)."""
        try:
            current = self._git("symbolic-ref", "-q", "--short", "HEAD")
        except git.GitCommandError:
            return False, "the main checkout has a detached HEAD"
        tip = self.branch_tip()
        head = self._git("rev-parse", "HEAD")
        if tip is None or head == tip:
            return True, f"{current} already at {head[:10]}"
        if not self.is_ancestor(head, tip):
            return False, f"{current} has diverged from {self.branch}; merge it yourself"
        try:
            self._git("merge", "--ff-only", "-q", self.ref)
        except git.GitCommandError as e:
            return False, f"fast-forward of {current} refused: {e.stderr.strip()[-300:]}"
        return True, f"{current} fast-forwarded to {tip[:10]}"

    # -- rounds --------------------------------------------------------------------------------------
    def create_round(self, name: str) -> RoundTree:
        path = self.worktrees_dir / name
        self.remove_round(path)
        self.worktrees_dir.mkdir(parents=True, exist_ok=True)
        base = self.ensure_branch()
        self._git("worktree", "add", "--detach", "-f", str(path), base)
        gitdir = (path / ".git").read_text().strip().removeprefix("gitdir:").strip()  # just written by git
        return RoundTree(name, path, base, path / self.engine_rel, git_admin=Path(gitdir).resolve())

    def remove_round(self, path: Path) -> None:
        """Delete the worktree's files and its engine's compile caches (the gates keep one per engine location,
        so a round's would never be used again), then let git forget it (git never runs inside it)."""
        from gates.launch import remove_engine_caches

        remove_engine_caches(path / self.engine_rel)
        if path.exists():
            _rmtree(path)
        self._git("worktree", "prune")

    def cleanup_stale(self) -> list[str]:
        """Remove every worktree a killed run left under the state dir; returns their names."""
        gone = []
        if self.worktrees_dir.is_dir():
            for child in sorted(self.worktrees_dir.iterdir()):
                self.remove_round(child)
                gone.append(child.name)
        self._git("worktree", "prune")
        return gone

    def apply_patch(self, rt: RoundTree, patch: Path) -> bool:
        try:
            self._round_git(rt, "apply", "--whitespace=nowarn", str(patch))
            return True
        except git.GitCommandError:
            return False

    # -- snapshot, check, commit -------------------------------------------------------------------
    def snapshot(self, rt: RoundTree) -> Snapshot:
        """The worktree's files as a tree object, and what changed against the round's base. A changed file
        holding a secret is redacted in place first (`Snapshot.secrets`): no secret reaches the objects."""
        self._junk.parent.mkdir(parents=True, exist_ok=True)
        self._junk.write_text("\n".join(JUNK) + "\n")
        secrets: list[str] = []
        self.worktrees_dir.mkdir(parents=True, exist_ok=True)
        # under the worktrees dir: a kill -9 mid-snapshot leaves nothing that resume's cleanup does not remove
        with tempfile.TemporaryDirectory(prefix=f".snapshot-{rt.name}-", dir=self.worktrees_dir) as tmp:
            for attempt in range(2):  # each in a fresh quarantine: a dirty attempt's objects are dropped
                quarantine = Path(tmp) / f"objects-{attempt}"
                quarantine.mkdir()
                env = {"GIT_INDEX_FILE": os.path.join(tmp, f"index-{attempt}"), "GIT_OBJECT_DIRECTORY": str(quarantine),
                       "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(self.git_common / "objects")}
                self._round_git(rt, "read-tree", rt.base, env=env)
                self._round_git(rt, "-c", f"core.excludesFile={self._junk}", "add", "-A", "--", ".", env=env)
                tree = self._round_git(rt, "write-tree", env=env)
                changes = _parse_raw(self._round_git(rt, "diff-tree", "-r", "-z", "--no-renames", rt.base, tree, env=env))
                dirty = [c.path for c in changes if c.status != "D" and holds_secret(self._blob(tree, c.path, env))]
                if not dirty:
                    break
                if attempt == 1:
                    raise WorkspaceError(f"secrets survived redaction in {', '.join(dirty)}")
                for path in dirty:
                    redact_file(rt.path / path)
                secrets += dirty
            _migrate(quarantine, self.git_common / "objects")
        for c in changes:
            if c.mode == "120000":
                c.target = self._git("cat-file", "blob", f"{tree}:{c.path}")
        ins = dels = 0
        for line in self._git("diff-tree", "-r", "--numstat", "--no-renames", rt.base, tree).splitlines():
            a, d, *_ = line.split("\t")
            ins += int(a) if a.isdigit() else 0
            dels += int(d) if d.isdigit() else 0
        return Snapshot(tree, changes, ins, dels, secrets)

    def _blob(self, tree: str, path: str, env: dict[str, str]) -> bytes:
        return self.repo.git.execute(["git", *SAFE, "cat-file", "blob", f"{tree}:{path}"], as_process=False,
                                     stdout_as_string=False, env=env)

    def forbidden(self, snap: Snapshot, allowed: list[str]) -> list[str]:
        """Changed paths the agent may not touch (each with the reason)."""
        prefix = "" if self.engine_rel in ("", ".") else self.engine_rel + "/"
        bad = [f"{p} (held a secret: redacted)" for p in snap.secrets]
        for c in snap.changes:
            if not c.path.startswith(prefix):
                bad.append(f"{c.path} (outside the engine)")
                continue
            rel = c.path[len(prefix):]
            if matches(rel, HARNESS_OWNED):
                bad.append(f"{c.path} (written by the harness only)")
            elif not matches(rel, allowed):
                bad.append(f"{c.path} (not in allowed_paths)")
            elif c.target is not None and _escapes(PurePosixPath(rel).parent, c.target):
                bad.append(f"{c.path} (symlink leaving the engine: {c.target})")
        return bad

    def patch(self, rt: RoundTree, snap: Snapshot) -> str:
        return self._git("diff-tree", "-p", "--binary", "--no-renames", rt.base, snap.tree) + "\n"

    def commit_tree(self, tree: str, parent: str, message: str) -> str:
        with tempfile.NamedTemporaryFile("w", suffix=".msg", delete=False) as f:
            f.write(redact(message))
        try:
            return self._git("commit-tree", tree, "-p", parent, "-F", f.name)
        finally:
            os.unlink(f.name)

    def tree_with_files(self, tree: str, files: dict[str, bytes]) -> str:
        """`tree` with `files` (paths relative to the engine, contents redacted) added or replaced."""
        with tempfile.TemporaryDirectory(prefix="forge-index-") as tmp:
            env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
            self._git("read-tree", tree, env=env)
            for rel, data in files.items():
                blob_file = Path(tmp) / "blob"
                blob_file.write_bytes(redact_bytes(data))
                blob = self._git("hash-object", "-w", str(blob_file))
                path = rel if self.engine_rel in ("", ".") else f"{self.engine_rel}/{rel}"
                self._git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
            return self._git("write-tree", env=env)

    def read_file(self, commit: str, rel: str) -> bytes | None:
        """A file of the engine at `commit` (None if absent)."""
        path = rel if self.engine_rel in ("", ".") else f"{self.engine_rel}/{rel}"
        try:
            return self.repo.git.execute(["git", "show", f"{commit}:{path}"], as_process=False,
                                         stdout_as_string=False)
        except git.GitCommandError:
            return None


def _rmtree(path: Path) -> None:
    """rmtree that first gives back write permission an agent may have taken from its directories."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                try:
                    os.chmod(p, stat.S_IRWXU)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)


def _migrate(quarantine: Path, objects: Path) -> None:
    """Copy a snapshot's new objects (loose, or packs for big files) into the repository, each file whole."""
    for src in [*quarantine.glob("??/*"), *quarantine.glob("pack/*")]:
        dst = objects / src.parent.name / src.name
        if not dst.exists():
            dst.parent.mkdir(exist_ok=True)
            tmp = dst.with_name(f".tmp-{os.getpid()}-{src.name}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)


def _parse_raw(raw: str) -> list[Change]:
    """`git diff-tree -r -z` raw output: ':old new oldsha newsha STATUS\\0path\\0' records."""
    parts = raw.split("\0")
    out, i = [], 0
    while i + 1 < len(parts):
        meta = parts[i]
        if not meta.startswith(":"):
            i += 1
            continue
        _, new_mode, _, _, status = meta[1:].split(" ")
        out.append(Change(parts[i + 1], status[0], new_mode))
        i += 2
    return out


def _escapes(parent: PurePosixPath, target: str) -> bool:
    if target.startswith("/"):
        return True
    depth = len(parent.parts)
    for part in PurePosixPath(target).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False
