"""The commands a GPU session part runs (`Step`), and the runner that runs a part's steps into its folder.

Stdlib only: the GPU image runs this before any carried wheel is known to import.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENGINE = "exports/train_engine_0.5B"
LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class Context:
    """What every part's plan depends on: the repository root, the part's output folder, the inherited env."""

    root: Path
    out: Path
    env: Mapping[str, str]
    gate_sandbox: str | None = None  # None: the gates' default (required); "preferred" where bwrap cannot run
    repeat: int = 1  # the part's k-th group in this call: its folder and bundle are <part>-k from the second on

    def label(self, part: str) -> str:
        return part if self.repeat == 1 else f"{part}-{self.repeat}"

    def part_dir(self, part: str) -> Path:
        return self.out / self.label(part)

    def engine_pythonpath(self, src: Path | str | None = None) -> dict[str, str]:
        """An engine's package first on PYTHONPATH (it is not installed on the GPU image): `src`, a source folder
        (default: the 0.5B's in this tree)."""
        rest = self.env.get("PYTHONPATH", "")
        first = src if src is not None else self.root / ENGINE / "src"
        return {"PYTHONPATH": f"{first}{':' + rest if rest else ''}"}

    def sandbox_args(self) -> list[str]:
        return ["--sandbox", self.gate_sandbox] if self.gate_sandbox else []


@dataclass(frozen=True)
class Step:
    """One command of a part: argv under `timeout timeout_s` (none: no limit), with env overrides.

    stdout and stderr append to the part's log.txt unless stderr_file names another file; after it, `note`
    (formatted with the exit code as {rc}) and the first `"tokens_per_s"` line of `json_summary` go to the log.
    """

    argv: tuple[str, ...]
    timeout_s: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    stderr_file: Path | None = None
    note: str | None = None
    json_summary: Path | None = None

    def command(self) -> list[str]:
        """The exact argv run: env overrides and timeout included (what --dry-run prints)."""
        prefix = ["env", *(f"{k}={v}" for k, v in self.env.items())] if self.env else []
        limit = ["timeout", str(self.timeout_s)] if self.timeout_s is not None else []
        return [*prefix, *limit, *self.argv]

    def describe(self, log: Path) -> str:
        err = f"2> {shlex.quote(str(self.stderr_file))}" if self.stderr_file else "2>&1"
        return f"{shlex.join(self.command())} >> {shlex.quote(str(log))} {err}"


@dataclass(frozen=True)
class Plan:
    """A part's steps, in order, and the files gzipped once they have all run."""

    steps: tuple[Step, ...]
    gzip: tuple[Path, ...] = ()


def step(*argv: str | Path, timeout_s: int | None = None, env: Mapping[str, str] | None = None,
         stderr_file: Path | None = None, note: str | None = None, json_summary: Path | None = None) -> Step:
    return Step(tuple(str(a) for a in argv), timeout_s, dict(env or {}), stderr_file, note, json_summary)


def _first_line_with(path: Path, needle: str) -> str | None:
    try:
        return next((line for line in path.read_text(errors="replace").splitlines() if needle in line), None)
    except OSError:
        return None


def run_step(s: Step, cwd: Path, log: Path) -> int:
    with open(log, "ab") as out:
        err = open(s.stderr_file, "wb") if s.stderr_file else subprocess.STDOUT
        try:
            rc = subprocess.run(s.command(), cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL).returncode
        finally:
            if s.stderr_file:
                err.close()
    with open(log, "a") as out:
        if s.note:
            out.write(s.note.format(rc=rc) + "\n")
        line = _first_line_with(s.json_summary, '"tokens_per_s"') if s.json_summary else None
        if line:
            out.write(line + "\n")
    return rc


def _gzip(path: Path) -> None:
    if path.is_file():
        subprocess.run(["gzip", "-f", str(path)], check=False)


def run_part(name: str, plan: Plan, ctx: Context) -> int:
    """Run a part's steps into $OUT/<label>/, print its exit (the last step's) and log tail, bundle it as <label>.tgz
    (the label: the part's name, with -k for its k-th group in the call)."""
    d, name = ctx.part_dir(name), ctx.label(name)
    d.mkdir(parents=True, exist_ok=True)
    log = d / "log.txt"
    log.write_text("")
    t0 = time.monotonic()
    rc = 0
    for s in plan.steps:
        rc = run_step(s, ctx.root, log)
    for path in plan.gzip:
        _gzip(path)
    print(f"[{name}] exit {rc} in {int(time.monotonic() - t0)}s", flush=True)
    print("\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]), flush=True)
    try:  # the folder goes only once its bundle is written
        with tarfile.open(ctx.out / f"{name}.tgz", "w:gz") as tar:
            tar.add(d, arcname=name)
        shutil.rmtree(d)
    except OSError as e:
        print(f"[{name}] bundling failed ({e}): {d} kept", flush=True)
    return rc


def print_plan(name: str, plan: Plan, ctx: Context) -> None:
    log = ctx.part_dir(name) / "log.txt"
    print(f"[{ctx.label(name)}] -> {ctx.out / (ctx.label(name) + '.tgz')}")
    for s in plan.steps:
        print(f"  {s.describe(log)}")
    for path in plan.gzip:
        print(f"  gzip {shlex.quote(str(path))}  (if it exists)")


def argv_lists(plan: Plan) -> list[list[str]]:
    return [s.command() for s in plan.steps]


def listing(out: Path) -> None:
    subprocess.run(["ls", "-la", str(out)], check=False)
