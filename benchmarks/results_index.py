"""The index of committed benchmark results: `benchmarks/results/index.jsonl`, one line per result.

A result is a top-level file group (`2026-11-24-h100-minicpm4-0.5b-ce-split.{json,md}`: its id is the name without
the extension) or a folder (`engine-0.5b-ce-split-2026-11-24-h100/`, `gates/2026-12-02-h200-pretrain-gates/`: its
id is the folder). Each entry lists every file of the result and what the files record of themselves: date and
device (from the name), the commit it ran at (or a note that none was recorded), versions, headline figures.

`status` is `current` for the newest result of its line (side-by-side comparisons on one device, the M1-M3 gates,
the training-path gates, the engine's experiment sessions, ...); `superseded` when a newer result of the same line
replaced its figures (`superseded_by`). A superseded result that nothing cites moves under `archive/`
(`python -m benchmarks results-archive`, benchmarks/archive.py); a cited one stays where its citations point.

    python -m benchmarks.results_index check     # every file in exactly one entry, every path exists, README current
    python -m benchmarks.results_index readme    # rewrite results/README.md's tables from the index, and the
                                                 # repository README's generated blocks (BLOCKS: M5's gate-clock
                                                 # figures, the current side-by-side comparisons)
    python -m benchmarks.results_index refresh   # re-read every entry's figures from its files
    python -m benchmarks.results_index add engine-foo-2026-12-03-h200/ --kind engine-experiment --what "..." \\
        [--supersedes ID ...]                    # append one entry (result writers call `add_entry`)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INDEX_FILE = "index.jsonl"
README_FILE = "README.md"
NOT_RESULTS = (INDEX_FILE, README_FILE)  # the only files under results/ that belong to no result

Device = Literal["h100", "h200", "cpu"]
Kind = Literal["compare", "gates", "engine-experiment", "op-bench", "agreement"]
Status = Literal["current", "superseded"]

COMMIT = re.compile(r"[0-9a-f]{7,40}")
NAME = re.compile(r"(\d{4}-\d{2}-\d{2})-(h100|h200|cpu)(?=-|$)")  # both naming schemes carry <date>-<device>
COMMIT_LINE = re.compile(r"\s*commit[:\s]+([0-9a-f]{7,40})\b", re.IGNORECASE)  # env.txt / NOTES.md convention
SUFFIXES = (".json", ".md", ".txt", ".log", ".jsonl", ".gz")  # what `result_id` strips from a file group's names
VERSION_KEYS = ("python", "torch", "cuda", "triton", "megatron_core", "transformer_engine", "transformers",
                "quack_kernels", "flash_attn_4")
NOTES_VERSION = re.compile(r"\b(torch|triton|quack-kernels|flash-attn-4|megatron-core|cuda) (\d[\w.+]*\w)")


class StackFigure(BaseModel):
    """One stack's row of a side-by-side comparison."""
    model_config = ConfigDict(extra="forbid")
    status: str
    micro_batch_size: int | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None


class Entry(BaseModel):
    """One committed result."""
    model_config = ConfigDict(extra="forbid")
    id: str
    date: dt.date
    device: Device
    kind: Kind
    model: str | None = None
    status: Status = "current"
    superseded_by: str | None = None
    commit: str | None = None           # the commit the result (its headline figure) ran at, as its files record it
    commit_source: str | None = None    # where that commit is written
    commit_note: str | None = None      # required without a commit: why there is none; else other commits of parts
    versions: dict[str, str] = {}
    what: str                           # one line
    stacks: dict[str, StackFigure] = {}  # compare results: per-stack figures
    metrics: dict[str, float | int | str | bool] = {}  # other headline figures (gate verdicts, bench tokens/s)
    metrics_from: list[str] = []        # the files `stacks` and `metrics` were read from
    paths: list[str]                    # every file of the result, relative to benchmarks/results

    @model_validator(mode="after")
    def _consistent(self) -> Entry:
        if not self.paths:
            raise ValueError(f"{self.id}: paths is empty")
        if self.paths != sorted(set(self.paths)):
            raise ValueError(f"{self.id}: paths must be sorted and unique")
        for p in self.paths:
            if not belongs(p, self.id):
                raise ValueError(f"{self.id}: path {p} is neither {self.id}/... nor {self.id}.<ext>")
        if self.commit is None and not (self.commit_note or "").startswith("not recorded"):
            raise ValueError(f"{self.id}: commit is null, so commit_note must say 'not recorded ...'")
        if self.commit is not None and (not COMMIT.fullmatch(self.commit) or not self.commit_source):
            raise ValueError(f"{self.id}: commit {self.commit!r} must be 7-40 hex digits with a commit_source")
        if (self.status == "superseded") != (self.superseded_by is not None):
            raise ValueError(f"{self.id}: superseded_by is set exactly when status is superseded")
        if "\n" in self.what or not self.what.strip():
            raise ValueError(f"{self.id}: what must be one non-empty line")
        return self


def belongs(path: str, result_id: str) -> bool:
    """Whether `path` is a file of the result `result_id` (a folder's file, or `<id>.<ext>`)."""
    if path.startswith("/") or ".." in path.split("/"):
        return False
    if path.startswith(result_id + "/"):
        return True
    return path.startswith(result_id + ".") and "/" not in path[len(result_id):]


# -- the index on disk ------------------------------------------------------------------------------------------

def load(root: Path = RESULTS_DIR) -> list[Entry]:
    """The entries of root/index.jsonl, in file order; a bad line raises ValueError naming it."""
    entries = []
    for n, line in enumerate((root / INDEX_FILE).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(Entry.model_validate_json(line))
        except ValidationError as e:
            raise ValueError(f"{INDEX_FILE} line {n}: {e.errors()[0]['msg']}") from None
    return entries


def save(entries: list[Entry], root: Path = RESULTS_DIR) -> None:
    (root / INDEX_FILE).write_text("".join(e.model_dump_json() + "\n" for e in entries))


def files_under(root: Path = RESULTS_DIR) -> list[str]:
    """Every file under root that should belong to a result, relative and sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() not in NOT_RESULTS)


def problems(root: Path = RESULTS_DIR) -> list[str]:
    """Everything wrong with root's index, first problem first; empty when it is complete and consistent."""
    try:
        entries = load(root)
    except (OSError, ValueError) as e:
        return [str(e)]
    found: list[str] = []
    ids = Counter(e.id for e in entries)
    found += [f"id {i} appears {n} times in {INDEX_FILE}" for i, n in ids.items() if n > 1]
    owner: dict[str, str] = {}
    for e in entries:
        for p in e.paths:
            if not (root / p).is_file():
                found.append(f"{e.id}: indexed path {p} does not exist")
            if p in owner:
                found.append(f"{p} belongs to two entries: {owner[p]} and {e.id}")
            owner.setdefault(p, e.id)
        if e.superseded_by is not None and e.superseded_by not in ids:
            found.append(f"{e.id}: superseded_by {e.superseded_by} is not an entry")
    found += [f"{p} belongs to no entry of {INDEX_FILE} (python -m benchmarks.results_index add ...)"
              for p in files_under(root) if p not in owner]
    if not found and (root / README_FILE).read_text() != render_readme(entries):
        found.append(f"{README_FILE} is not the rendering of {INDEX_FILE}: python -m benchmarks.results_index readme")
    top = root.parents[1] / README_FILE
    if not found and top.is_file() and (text := top.read_text()) != with_blocks(text, entries):
        found.append(f"{top.name}'s generated tables are not the index's: python -m benchmarks.results_index readme")
    return found


# -- what a result's own files record ---------------------------------------------------------------------------

def parse_name(result_id: str) -> tuple[dt.date, str]:
    """Date and device from a result's name (`<date>-<device>-...` or `...-<date>-<device>`)."""
    m = NAME.search(result_id.rsplit("/", 1)[-1])
    if m is None:
        raise ValueError(f"{result_id}: the name carries no <date>-<device> (device one of h100, h200, cpu)")
    return dt.date.fromisoformat(m.group(1)), m.group(2)


def result_id(paths: list[str]) -> str:
    """The id of a top-level file group: the common name of its files without their extensions."""
    stems = set()
    for p in paths:
        stem = p
        while stem.endswith(SUFFIXES):
            stem = stem[: stem.rfind(".")]
        stems.add(stem)
    if len(stems) != 1:
        raise ValueError(f"files of one result share one name without extensions; got {sorted(stems)}")
    return stems.pop()


def _json(root: Path, path: str) -> object:
    try:
        return json.loads((root / path).read_text())
    except (OSError, ValueError):
        return None


def _by_depth(paths: list[str]) -> list[str]:
    return sorted(paths, key=lambda p: (p.count("/"), p))


def recorded_commit(root: Path, paths: list[str]) -> tuple[str | None, str | None, str | None]:
    """(commit, source, note) from the files themselves: a JSON's `git_commit`, or a `commit <hex>` line of an
    env.txt / NOTES.md. Never guessed: without one the note says it was not recorded."""
    found: list[tuple[str, str]] = []
    unusable: list[str] = []
    for p in _by_depth(paths):
        name = p.rsplit("/", 1)[-1]
        if name.endswith(".json"):
            data = _json(root, p)
            if isinstance(data, dict) and "git_commit" in data:
                value = data["git_commit"]
                if isinstance(value, str) and COMMIT.fullmatch(value.strip()):
                    found.append((value.strip(), f"{p}: git_commit"))
                else:
                    unusable.append(f"{p}'s git_commit is {value!r}")
        elif name in ("env.txt", "NOTES.md"):
            for line in (root / p).read_text().splitlines():
                m = COMMIT_LINE.match(line)
                if m:
                    found.append((m.group(1), f"{p}: commit line"))
                    break
    if not found:
        return None, None, "not recorded: " + ("; ".join(unusable) or "none of its files records a commit")
    commit, source = found[0]
    others = sorted({f"{c} ({s})" for c, s in found[1:] if c != commit})
    return commit, source, ("its files also record " + ", ".join(others)) if others else None


def recorded_versions(root: Path, paths: list[str]) -> dict[str, str]:
    """Package versions as the files record them (the first file that names a package wins)."""
    versions: dict[str, str] = {}

    def put(key: str, value: object) -> None:
        key = key.replace("-", "_")
        if key in VERSION_KEYS and isinstance(value, str) and value:
            versions.setdefault(key, value)

    for p in _by_depth(paths):
        if p.endswith(".json"):
            data = _json(root, p)
            if isinstance(data, dict):
                for k, v in (data.get("versions") or {}).items():
                    put(k, v)
                for k in ("torch", "triton"):
                    put(k, data.get(k))
        elif p.endswith((".md", ".txt")):  # NOTES.md, env.txt, a report's header lines
            with open(root / p, errors="replace") as f:
                head = "".join(f.readline() for _ in range(6))
            for k, v in NOTES_VERSION.findall(head):
                put(k, v)
    return dict(sorted(versions.items()))


def _round(x: object, digits: int) -> float | None:
    return round(x, digits) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def headline(root: Path, result: str, paths: list[str]) -> tuple[dict[str, StackFigure], dict, list[str]]:
    """(stacks, metrics, files read) from the JSON files: a comparison's per-stack rows and the engines' ratios,
    gate verdicts, a bench's tokens/s and MFU and an agreement's verdict (the last two of file groups only)."""
    group = not paths[0].startswith(result + "/")
    stacks: dict[str, StackFigure] = {}
    metrics: dict[str, float | int | str | bool] = {}
    read: list[str] = []
    for p in _by_depth(paths):
        if not p.endswith(".json"):
            continue
        data = _json(root, p)
        if not isinstance(data, dict):
            continue
        key = "" if group else p[len(result) + 1: -len(".json")]
        if group and isinstance(data.get("results"), list) and "settings" in data:
            for row in data["results"]:
                stacks[row["stack"]] = StackFigure(
                    status=row.get("status", "?"), micro_batch_size=row.get("micro_batch_size"),
                    tokens_per_s=_round(row.get("tokens_per_s"), 1), mfu=_round(row.get("mfu"), 6),
                    peak_gib=_round(row.get("peak_mem_gib"), 2))
                if row.get("kind") == "engine":
                    for base, r in (row.get("vs") or {}).items():
                        if r is not None and base != row["stack"]:
                            metrics[f"{row['stack']} x {base}"] = round(r, 4)
        elif "gate" in data and "verdict" in data:
            metrics[key or data["gate"]] = data["verdict"]
            metrics |= gate_clock(key or data["gate"], data)
        elif group and isinstance(data.get("tokens_per_s"), (int, float)):
            metrics["tokens_per_s"] = _round(data["tokens_per_s"], 1)
            if isinstance(data.get("mfu"), (int, float)):
                metrics["mfu"] = _round(data["mfu"], 6)
        elif is_bench(data):  # a bench run inside a folder result (beside the gates it was run with)
            metrics[f"{key}{BENCH} tokens_per_s"] = _round(data["tokens_per_s"], 1)
            metrics[f"{key}{BENCH} mfu"] = _round(data["mfu"], 6)
            if isinstance(data["config"].get("micro_batch_size"), int):
                metrics[f"{key}{BENCH} micro_batch_size"] = data["config"]["micro_batch_size"]
        elif group and isinstance(data.get("agree"), bool):
            metrics["agree"] = data["agree"]
        else:
            continue
        read.append(p)
    return stacks, metrics, read


BENCH = " bench"  # the metric keys of an engine bench JSON inside a folder result: "<file> bench tokens_per_s", "... mfu"
CLOCK = " mfu part"  # the metric keys of M5's speed part: "<report> mfu part" (verdict), "... tokens_per_s", ...
CLOCK_NUMBERS = ("tokens_per_s", "mfu", "global_batch_size", "seq_length", "clock")
# how the gate timed it: one run's log lines (gates/line_clock.py), or, in reports before that, two runs' walls
CLOCKS = {True: "log lines", False: "walls 2N-N"}


def gate_clock(key: str, report: dict) -> dict[str, float | int | str]:
    """M5's speed part, when its report timed `pretrain` (the gate's clock): its verdict and figures."""
    part = next((p for p in report.get("parts") or [] if p.get("name") == "mfu"), None)
    numbers = (part or {}).get("numbers") or {}
    if not isinstance(numbers.get("tokens_per_s"), (int, float)):
        return {}
    out: dict[str, float | int | str] = {key + CLOCK: part["verdict"], f"{key}{CLOCK} clock": CLOCKS["lines_span_s" in numbers]}
    for name in CLOCK_NUMBERS:  # the clock's own key is the string set above, never a number
        if isinstance(numbers.get(name), (int, float)):
            out[f"{key}{CLOCK} {name}"] = _round(numbers[name], 6) if isinstance(numbers[name], float) else numbers[name]
    return out


def is_bench(data: dict) -> bool:
    """An engine `bench --json` file: its tokens/s and MFU with the config and step times it ran."""
    return (isinstance(data.get("tokens_per_s"), (int, float)) and isinstance(data.get("mfu"), (int, float))
            and isinstance(data.get("config"), dict) and isinstance(data.get("step_times_s"), list))


def bench_figures(e: Entry) -> list[tuple[float, float, int | None]]:
    """(tokens/s, MFU, micro batch) of every engine bench inside the entry."""
    return [(v, e.metrics.get(k[: -len(" tokens_per_s")] + " mfu"), e.metrics.get(k[: -len(" tokens_per_s")] + " micro_batch_size"))
            for k, v in e.metrics.items() if k.endswith(BENCH + " tokens_per_s")]


def benches_beside(e: Entry, report: str) -> list[tuple[float, float, int | None]]:
    """The entry's benches from the same call as `report` (its folder) when there are any, else all of them."""
    folder = report.rpartition("/")[0]
    same = [(v, e.metrics.get(k[: -len(" tokens_per_s")] + " mfu"), e.metrics.get(k[: -len(" tokens_per_s")] + " micro_batch_size"))
            for k, v in e.metrics.items() if k.endswith(BENCH + " tokens_per_s") and k.rpartition("/")[0] == folder]
    return same or bench_figures(e)


def gate_clock_rows(e: Entry) -> list[dict]:
    """One dict per M5 speed part the entry holds: report key, verdict and CLOCK_NUMBERS."""
    return [{"report": k[: -len(CLOCK)], "verdict": v,
             **{n: e.metrics.get(f"{k} {n}") for n in CLOCK_NUMBERS}}
            for k, v in e.metrics.items() if k.endswith(CLOCK)]


def recorded_model(root: Path, paths: list[str]) -> str | None:
    for p in _by_depth(paths):
        data = _json(root, p) if p.endswith(".json") else None
        if isinstance(data, dict) and isinstance(data.get("settings"), dict):
            if isinstance(data["settings"].get("model"), str):
                return data["settings"]["model"]
    return None


def describe(paths: list[str], *, kind: str, what: str, root: Path = RESULTS_DIR, result: str | None = None,
             model: str | None = None) -> Entry:
    """An entry for files already under root, filled from what they record. `paths` are files, or one folder
    (the result is the folder: its id, all its files)."""
    paths = [p.rstrip("/") for p in paths]
    if len(paths) == 1 and (root / paths[0]).is_dir():
        result = result or paths[0]
        paths = [f for f in files_under(root) if f.startswith(paths[0] + "/")]
    result = result or result_id(paths)
    date, device = parse_name(result)
    commit, source, note = recorded_commit(root, paths)
    stacks, metrics, read = headline(root, result, paths)
    return Entry(id=result, paths=sorted(paths), date=date, device=device, kind=kind,
                 model=model or recorded_model(root, paths), commit=commit, commit_source=source,
                 commit_note=note, versions=recorded_versions(root, paths), what=what, stacks=stacks,
                 metrics=metrics, metrics_from=read)


def add_entry(entry: Entry, *, supersedes: tuple[str, ...] = (), root: Path = RESULTS_DIR) -> None:
    """Append `entry` to root's index, mark the entries it supersedes, and rewrite the README."""
    entries = load(root)
    known = {e.id: e for e in entries}
    if entry.id in known:
        raise ValueError(f"{entry.id} is already in {INDEX_FILE}")
    claimed = {p: e.id for e in entries for p in e.paths}
    for p in entry.paths:
        if p in claimed:
            raise ValueError(f"{p} already belongs to {claimed[p]}")
        if not (root / p).is_file():
            raise ValueError(f"{p} does not exist under {root}")
    for old in supersedes:
        if old not in known:
            raise ValueError(f"--supersedes {old}: no such entry")
        known[old].status, known[old].superseded_by = "superseded", entry.id
    entries.append(entry)
    save(entries, root)
    write_readme(root)


# -- the README ---------------------------------------------------------------------------------------------------

README_HEAD = """# Benchmark results

Generated from [`index.jsonl`](index.jsonl) by `python -m benchmarks.results_index readme`: edit the index, not this
file. Each result is one line of the index: every file of it, date, device, the commit it ran at (or a note that its
files do not record one), versions, headline figures, and whether a newer result superseded it. Every file here
belongs to exactly one result (`python -m benchmarks.results_index check`); result writers append with
`python -m benchmarks.results_index add` (or `benchmarks.results_index.add_entry`). Superseded results that nothing
cites live under [`archive/`](archive/) (`python -m benchmarks results-archive`); cited ones stay where they are cited.
"""


def result_cell(e: Entry) -> str:
    if e.paths[0].startswith(e.id + "/"):
        return f"[`{e.id}/`]({e.id}/)"
    exts = [p[len(e.id) + 1:] for p in e.paths]
    shown = exts[0] if len(exts) == 1 else "{" + ",".join(exts) + "}"
    target = e.id + ".md" if "md" in exts else e.paths[0]
    return f"[`{e.id}.{shown}`]({target})"


def figures(e: Entry) -> str:
    """The headline figures of an entry, from its stacks and metrics."""
    parts = [f"{name.removeprefix('engine:')} {s.tokens_per_s:,.0f} tok/s ({100 * s.mfu:.1f} %)"
             for name, s in e.stacks.items() if s.status == "ok" and s.tokens_per_s and s.mfu]
    parts += [f"{name} {s.status}" for name, s in e.stacks.items() if s.status != "ok"]
    ratios: dict[str, list[str]] = {}
    for key, value in e.metrics.items():
        if " x " in key:
            stack, base = key.split(" x ")
            ratios.setdefault(stack.removeprefix("engine:"), []).append(f"{value:.3f}x {base}")
    parts += [f"{stack}: {', '.join(r)}" for stack, r in ratios.items()]
    verdicts = Counter(f"{k.rsplit('/', 1)[-1]} {v}" for k, v in e.metrics.items()
                       if isinstance(v, str) and " x " not in k and not k.endswith(CLOCK))
    parts += [f"bench {t:,.0f} tok/s ({100 * m:.1f} %)" for t, m, _ in bench_figures(e)]
    parts += [f"M5 speed {r['verdict']}: {r['tokens_per_s']:,.0f} tok/s ({100 * r['mfu']:.1f} %) at global batch "
              f"{r['global_batch_size']}" for r in gate_clock_rows(e)]
    parts += [v if n == 1 else f"{v} x{n}" for v, n in verdicts.items()]
    if isinstance(e.metrics.get("tokens_per_s"), float):
        mfu = e.metrics.get("mfu")
        parts.append(f"{e.metrics['tokens_per_s']:,.0f} tok/s" + (f" ({100 * mfu:.1f} %)" if mfu else ""))
    if isinstance(e.metrics.get("agree"), bool):
        parts.append("agree" if e.metrics["agree"] else "disagreement flagged")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_readme(entries: list[Entry]) -> str:
    """README.md: the current results, newest first, then the superseded ones (same order)."""
    order = {e.id: n for n, e in enumerate(entries)}
    newest = sorted(entries, key=lambda e: (e.date, order[e.id]), reverse=True)

    def row(e: Entry, last: str) -> str:
        commit = f"`{e.commit[:7]}`" if e.commit else "not recorded"
        return (f"| {result_cell(e)} | {e.date} | {e.device} | {e.kind} | {commit} | {_cell(last)} |"
                f" {_cell(e.what)} |")

    current = [row(e, figures(e)) for e in newest if e.status == "current"]
    old = [row(e, f"`{e.superseded_by}`") for e in newest if e.status == "superseded"]
    head = "| result | date | device | kind | commit | {} | what |\n|---|---|---|---|---|---|---|"
    return "\n".join([README_HEAD, f"## Current ({len(current)})\n", head.format("figures (from its JSON)"),
                      *current, "", f"## Superseded ({len(old)})\n", head.format("superseded by"), *old, ""])


def write_readme(root: Path = RESULTS_DIR) -> None:
    entries = load(root)
    (root / README_FILE).write_text(render_readme(entries))
    top = root.parents[1] / README_FILE
    if top.is_file() and (text := top.read_text()) != (new := with_blocks(text, entries)):
        top.write_text(new)


# -- the repository README's tables of current figures ---------------------------------------------------------

def begin_marker(name: str) -> str:
    return f"<!-- generated: {name} (from benchmarks/results/index.jsonl by `python -m benchmarks.results_index readme`) -->"


def end_marker(name: str) -> str:
    return f"<!-- end generated: {name} -->"


def gate_clock_table(entries: list[Entry]) -> str:
    """Every current result's M5 speed parts (what users run, timed by the gate), newest first."""
    order = {e.id: n for n, e in enumerate(entries)}
    lines = ["| result | device | commit | M5 speed part | clock | tokens/s | MFU | global batch x seq | `bench` in the same "
             "result | gate / bench |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: (e.date, order[e.id]), reverse=True):
        if e.status != "current":
            continue
        for r in gate_clock_rows(e):
            benches = benches_beside(e, r["report"])
            bench = ", ".join(f"{t:,.0f} ({100 * m:.1f} %, micro batch {mb or '?'})" for t, m, mb in benches) or "-"
            where = f"[`{e.id}/{r['report']}`](benchmarks/results/{e.id}/{r['report']}.json)"
            ratio = ", ".join(f"{r['tokens_per_s'] / t:.3f}" for t, _, _ in benches) or "-"
            lines.append(f"| {where} | {e.device} | {'`' + e.commit[:7] + '`' if e.commit else 'not recorded'} | "
                         f"{r['verdict']} | {r['clock'] or CLOCKS[False]} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f} % | "
                         f"{r['global_batch_size']} x {r['seq_length']} | {bench} | {ratio} |")
    return "\n".join(lines)


def compare_table(entries: list[Entry]) -> str:
    """The current side-by-side comparisons: one row per stack, fastest first, then the engine's ratios."""
    out = []
    for e in (e for e in entries if e.kind == "compare" and e.status == "current"):
        rows = sorted(e.stacks.items(), key=lambda kv: -(kv[1].tokens_per_s or 0))
        out += [f"{result_cell(e).replace('](', '](benchmarks/results/')}, {e.device}, {e.date}, commit "
                f"{'`' + e.commit[:7] + '`' if e.commit else 'not recorded'}:", "",
                "| stack | micro batch | tokens/s | MFU | peak GiB |", "|---|---|---|---|---|"]
        for name, f in rows:
            cells = [f"{f.tokens_per_s:,.0f}" if f.tokens_per_s else "-", f"{100 * f.mfu:.1f} %" if f.mfu else "-",
                     f"{f.peak_gib:.1f}" if f.peak_gib else "-"]
            out.append(f"| {name.removeprefix('engine:')}{'' if f.status == 'ok' else ' (' + f.status + ')'} | "
                       f"{f.micro_batch_size or '-'} | {' | '.join(cells)} |")
        ratios = [f"{k.split(' x ')[0].removeprefix('engine:')} / {k.split(' x ')[1]} = {v:.3f}x"
                  for k, v in e.metrics.items() if " x " in k]
        out += ["", "; ".join(ratios) + "." if ratios else "", ""]
    return "\n".join(out).rstrip()


BLOCKS = {"gate-clock": gate_clock_table, "compare": compare_table}  # README blocks rendered from the index


def with_blocks(text: str, entries: list[Entry]) -> str:
    """`text` with every generated block (between its markers) replaced by its rendering from `entries`."""
    for name, render in BLOCKS.items():
        begin, end = begin_marker(name), end_marker(name)
        if begin not in text:
            continue
        head, rest = text.split(begin, 1)
        if end not in rest:
            raise ValueError(f"README: {begin!r} without {end!r}")
        text = f"{head}{begin}\n{render(entries)}\n{end}{rest.split(end, 1)[1]}"
    return text


def refresh(root: Path = RESULTS_DIR) -> list[str]:
    """Re-read every entry's headline figures from its files (after the reader learns a new figure); the ids whose
    figures changed."""
    entries, changed = load(root), []
    for e in entries:
        stacks, metrics, read = headline(root, e.id, e.paths)
        if (stacks, metrics, read) != (e.stacks, e.metrics, e.metrics_from):
            e.stacks, e.metrics, e.metrics_from = stacks, metrics, read
            changed.append(e.id)
    save(entries, root)
    write_readme(root)
    return changed


# -- command line ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.results_index", description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=RESULTS_DIR, help="the results folder (default: benchmarks/results)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="every file in exactly one entry, every indexed path exists, README current")
    sub.add_parser("readme", help="rewrite README.md (and the repository README's generated blocks) from the index")
    sub.add_parser("refresh", help="re-read every entry's headline figures from its files, then rewrite the READMEs")
    a = sub.add_parser("add", help="append one entry for files already under the results folder")
    a.add_argument("paths", nargs="+", help="the result's folder, or its files (relative to the results folder)")
    a.add_argument("--kind", required=True, choices=get_args(Kind))
    a.add_argument("--what", required=True, help="one line: what the result shows")
    a.add_argument("--model", default=None)
    a.add_argument("--supersedes", action="append", default=[], metavar="ID", help="an entry this one replaces")
    args = p.parse_args(argv)
    root = args.root.resolve()
    if args.command == "check":
        found = problems(root)
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            print(f"results index: {found[0]}{more}", file=sys.stderr)
            return 1
        entries = load(root)
        print(f"results index: {len(entries)} results, {sum(len(e.paths) for e in entries)} files, all indexed")
        return 0
    if args.command == "readme":
        write_readme(root)
        return 0
    if args.command == "refresh":
        changed = refresh(root)
        print(f"results index: figures re-read; changed: {', '.join(changed) or 'none'}")
        return 0
    rel = [Path(x).resolve().relative_to(root).as_posix() if Path(x).is_absolute() else x for x in args.paths]
    try:
        entry = describe(rel, kind=args.kind, what=args.what, root=root, model=args.model)
        add_entry(entry, supersedes=tuple(args.supersedes), root=root)
    except ValueError as e:
        print(f"results index: {e}", file=sys.stderr)
        return 1
    print(f"results index: added {entry.id} ({len(entry.paths)} files, commit {entry.commit or 'not recorded'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
