"""A GPU session: one or more parts, each writing $OUT/<part>/ and bundled into $OUT/<part>.tgz.

    bash benchmarks/gpu/session.sh [GLOBAL OPTIONS] PART [PART ...] [PART OPTIONS] [-- PART ... [PART OPTIONS]] ...

session.sh installs what the GPU image lacks, then runs `python3 -m benchmarks.gpu.session` with the same words.
Parts follow one another; the options after the last part name of a group belong to that part, and `--` starts
the next group; a part given again writes <part>-2/ (its own bundle). Everything is checked before anything runs: an unknown part or option runs nothing.
`PART --help` gives a part's options. Stdlib only: the GPU image runs this before any carried wheel is known to import.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gpu.session_parts import CHECKS, LEGACY_ENV, PARTS
from benchmarks.gpu.session_steps import Context, Plan, listing, print_plan, run_part

ROOT = Path(__file__).resolve().parents[2]
_VALUED_GLOBALS = ("--out", "--gate-sandbox")  # the global options that take a value


@dataclass(frozen=True)
class Invocation:
    options: argparse.Namespace
    parts: tuple[tuple[str, argparse.Namespace], ...]


def overview() -> str:
    """The top-level help: how to call, the global options, then each part with its options."""
    lines = [__doc__.strip(), "", global_parser().format_help().split("\n", 1)[1].strip(), "", "parts:"]
    for name, p in PARTS.items():
        usage = " ".join(p.parser().format_usage().split()[4:])  # drop "usage: session.sh NAME [-h]"
        lines += [f"  {name:10s} {p.help}", *([f"  {'':10s}   {usage}"] if usage else [])]
    return "\n".join(lines)


def global_parser() -> argparse.ArgumentParser:
    g = argparse.ArgumentParser(prog="session.sh", add_help=False, allow_abbrev=False,
                                usage="session.sh [GLOBAL OPTIONS] PART [PART ...] [OPTIONS] [-- PART ...]")
    g.add_argument("-h", "--help", action="store_true", help="this overview; PART --help: one part's options")
    g.add_argument("--out", default=os.environ.get("OUT"), help="where the parts write (default $OUT)")
    g.add_argument("--dry-run", action="store_true", help="print each part's exact commands, run nothing")
    g.add_argument("--check-only", action="store_true",
                   help="check the arguments and exit (session.sh, before its set-up)")
    g.add_argument("--gate-sandbox", choices=("required", "preferred"), default=None,
                   help="the gates' sandbox (session.sh passes preferred where bwrap cannot run)")
    return g


def split_groups(words: list[str]) -> tuple[list[str], list[list[str]]]:
    """The global options, then each `--`-separated group of words."""
    i = 0
    while i < len(words) and words[i].startswith("-") and words[i] != "--":
        i += 2 if words[i] in _VALUED_GLOBALS else 1
    head, rest = words[:i], words[i:]
    groups: list[list[str]] = [[]] if rest else []
    for w in rest:
        if w == "--":
            groups.append([])
        else:
            groups[-1].append(w)
    return head, groups


def parse(words: list[str]) -> Invocation:
    """All of it or nothing: exits 2 (argparse's way) on an unknown part, an unknown option, a bad value."""
    head, groups = split_groups(words)
    g = global_parser()
    opts = g.parse_args(head)
    if opts.help:
        print(overview())
        raise SystemExit(0)
    if legacy := sorted(k for k in LEGACY_ENV if k in os.environ):
        g.error("session.sh no longer reads " + "; ".join(f"{k} (now: {LEGACY_ENV[k]})" for k in legacy)
                + ": unset it")
    parts: list[tuple[str, argparse.Namespace]] = []
    for group in groups:
        names = group[: next((i for i, w in enumerate(group) if w.startswith("-")), len(group))]
        if not names:
            g.error(f"expected a part name, got {' '.join(group) or 'nothing'} (parts: {', '.join(PARTS)})")
        for k, name in enumerate(names):
            if name not in PARTS:
                g.error(f"unknown part {name!r} (parts: {', '.join(PARTS)})")
            p = PARTS[name].parser()
            a, extra = p.parse_known_args(group[len(names):] if k == len(names) - 1 else [])
            if extra:
                hint = " (a `--` goes before the next part)" if any(w in PARTS for w in extra) else ""
                p.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
            if name in CHECKS:
                CHECKS[name](a, p)
            parts.append((name, a))
    if parts and not opts.out and not opts.check_only:
        g.error("no output folder: set OUT or pass --out")
    return Invocation(opts, tuple(parts))


def plans(inv: Invocation, env: dict[str, str] | None = None) -> list[tuple[str, Plan, Context]]:
    """Each part's commands, from its options (nothing runs)."""
    ctx = Context(root=ROOT, out=Path(inv.options.out or ".").absolute(), env=dict(os.environ if env is None else env),
                  gate_sandbox=None if inv.options.gate_sandbox in (None, "required") else inv.options.gate_sandbox)
    out, seen = [], []
    for name, a in inv.parts:  # a part given again writes <part>-2, -3, ...
        seen.append(name)
        c = dataclasses.replace(ctx, repeat=seen.count(name))
        out.append((name, PARTS[name].plan(c, a), c))
    return out


def main(argv: list[str] | None = None) -> int:
    inv = parse(list(sys.argv[1:] if argv is None else argv))
    if inv.options.check_only:
        return 0
    todo = plans(inv)
    if inv.options.dry_run:
        for name, plan, ctx in todo:
            print_plan(name, plan, ctx)
        return 0
    for name, plan, ctx in todo:
        run_part(name, plan, ctx)
    if inv.options.out:
        listing(Path(inv.options.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
