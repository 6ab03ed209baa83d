"""Archive superseded results: each superseded result that no tracked file cites (outside the index, the generated
README and its own files) moves under `results/archive/`, keeping its name; its index entry (id, paths, and every
`superseded_by` that names it) follows, and the README is rendered again. A cited result stays where its citations
point. Moves go through `git mv` where the files are tracked, so history follows them.

    python -m benchmarks results-archive [--dry-run]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.results_index import INDEX_FILE, README_FILE, RESULTS_DIR, Entry, load, save, write_readme

ARCHIVE = "archive"  # results/archive/<id>: superseded, cited by nothing but the index


@dataclass
class Decision:
    entry: Entry
    kept_by: list[str]           # why it stays: files citing it that stay, results it cites that stay (empty: moves)

    @property
    def moves(self) -> bool:
        return not self.kept_by


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def _name(entry: Entry) -> str:
    return entry.id.rsplit("/", 1)[-1]


def citations(entry: Entry, repo: Path, root: Path) -> list[str]:
    """Tracked files that name the result (by its last path component), except the index, the README and its own."""
    exact = re.escape(_name(entry)) + r"([^-A-Za-z0-9_]|$)"  # not a longer name that starts with this one
    r = _git(repo, "grep", "-l", "-E", exact, "--", ".")
    own = {(root / p).resolve() for p in entry.paths} | {(root / INDEX_FILE).resolve(), (root / README_FILE).resolve()}
    return [f for f in r.stdout.splitlines() if (repo / f).resolve() not in own]


def plan(root: Path = RESULTS_DIR) -> list[Decision]:
    """What `archive` would do with each superseded result not archived yet. A result moves when nothing cites it
    but results that move with it, and it cites (by relative path) only results that move with it too: the links
    between archived results keep their shape under archive/."""
    repo = Path(_git(root, "rev-parse", "--show-toplevel").stdout.strip() or root)
    entries = load(root)
    files = {e.id: {(repo / f).resolve() for f in _git(repo, "ls-files", "--", *e.paths).stdout.split()}
             or {(root / p).resolve() for p in e.paths} for e in entries}
    cited = {e.id: citations(e, repo, root) for e in entries}
    by_file = {f: e.id for e in entries for f in files[e.id]}
    stuck: dict[str, list[str]] = {}
    todo = [e for e in entries if e.status == "superseded" and not e.id.startswith(ARCHIVE + "/")]
    moving = {e.id for e in todo}
    changed = True
    while changed:  # a result pinned in place pins what it cites and what cites it
        changed = False
        for e in todo:
            if e.id not in moving:
                continue
            outside = [f"cited by {f}" for f in cited[e.id] if by_file.get((repo / f).resolve()) not in moving]
            pins = [o.id for o in entries if o.id != e.id and o.id not in moving
                    and any((repo / f).resolve() in files[e.id] for f in cited[o.id])]
            if outside or pins:
                moving.discard(e.id)
                stuck[e.id] = outside + [f"cites {i}" for i in pins]
                changed = True
    return [Decision(e, stuck.get(e.id, [])) for e in todo]


def _move(root: Path, src: str, dst: str) -> None:
    (root / dst).parent.mkdir(parents=True, exist_ok=True)
    if _git(root, "ls-files", "--error-unmatch", src).returncode == 0:
        r = _git(root, "mv", src, dst)
        if r.returncode != 0:
            raise RuntimeError(f"git mv {src} {dst}: {r.stderr.strip()}")
    else:
        shutil.move(root / src, root / dst)
    parent = (root / src).parent
    while parent != root and parent.is_dir() and not any(parent.iterdir()):  # git mv leaves empty folders
        parent.rmdir()
        parent = parent.parent


def archive(root: Path = RESULTS_DIR, dry_run: bool = False) -> list[Decision]:
    """Move every uncited superseded result under archive/ and rewrite the index and README; returns the plan."""
    decisions = plan(root)
    moving = {d.entry.id: f"{ARCHIVE}/{d.entry.id}" for d in decisions if d.moves}
    if dry_run or not moving:
        return decisions
    entries = load(root)
    for e in entries:
        if e.id in moving:
            new = moving[e.id]
            for p in e.paths:
                _move(root, p, new + p[len(e.id):])
            e.paths = sorted(new + p[len(e.id):] for p in e.paths)
            e.id = new
        if e.superseded_by in moving:
            e.superseded_by = moving[e.superseded_by]
    save([Entry.model_validate(e.model_dump()) for e in entries], root)  # validated again: ids and paths agree
    write_readme(root)
    return decisions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks results-archive", description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=RESULTS_DIR, help="the results folder (default: benchmarks/results)")
    p.add_argument("--dry-run", action="store_true", help="print what would move, move nothing")
    args = p.parse_args(argv)
    decisions = archive(args.root.resolve(), dry_run=args.dry_run)
    for d in decisions:
        what = "moves to" if d.moves else "stays: " + "; ".join(d.kept_by[:3])
        print(f"{d.entry.id}: {what}" + (f" {ARCHIVE}/{d.entry.id}" if d.moves else ""))
    moved = sum(d.moves for d in decisions)
    print(f"results archive: {moved} of {len(decisions)} superseded results "
          + ("would move" if args.dry_run else "moved") + f" under {ARCHIVE}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
