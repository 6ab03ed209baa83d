"""What an engine is and what it has proven, from the engine's own files only (`inspect ENGINE`).

- identity: `model_spec.toml` ([model], [engine], and [ops] when the engine lists one); the op registry
  from the engine's own `info` command (implementations, the default per device);
- evidence: `manifest.json` (gates a forge run or `certify` accepted, with numbers, hardware and commit; elected ops), and the
  gate reports it points to; a note when the engine's code (src/, pyproject.toml) differs from the commit a gate judged;
- history: the forge run that wrote the manifest (its rounds from the engine's `forge/ledger.jsonl` or the run's
  state dir under `<repo>/.git/forge/`), and ledgers given with --ledger; never another run on the same path;
- figures the user names: training logs (JSONL lines with `step` and `loss`, and `eval_loss` where the engine
  evaluated), benchmark result JSONs (--bench). Committed results of other machines are not this engine's proof.

Every figure says the hardware it came from. `write` saves report.json, report.md and loss_mfu.png.
"""

from __future__ import annotations

import ast
import json
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import launcher
from harness.gating import accepted_label, unsupported_parts
from harness.ledger import Ledger, read_jsonl


class NotAnEngine(ValueError):
    """The folder is not an engine: nothing is inspected or written."""


@dataclass
class TrainLog:
    path: str
    device: str                                   # where it trained, or "device not recorded"
    steps: list[dict[str, Any]] = field(default_factory=list)   # lines with step + loss
    evals: list[dict[str, Any]] = field(default_factory=list)   # lines with step + eval_loss


@dataclass
class Inspection:
    engine: str
    model: dict[str, Any] = field(default_factory=dict)
    engine_info: dict[str, Any] = field(default_factory=dict)
    ops: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)       # one row per gate of manifest.json
    rounds: list[dict[str, Any]] = field(default_factory=list)
    benchmarks: list[dict[str, Any]] = field(default_factory=list)  # rows of the --bench files
    train_logs: list[TrainLog] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def engine_package(engine: Path) -> str:
    """The engine's package (the one `src/<pkg>/__main__.py`); NotAnEngine says why a folder is not one."""
    if not engine.is_dir():
        raise NotAnEngine(f"{engine} is not a directory")
    found = sorted(p.parent.name for p in (engine / "src").glob("*/__main__.py"))
    if len(found) != 1:
        what = "no src/<package>/__main__.py" if not found else f"several CLI packages under src/ ({', '.join(found)})"
        raise NotAnEngine(f"{engine} is not an engine folder: {what} (the engine layout: exports/README.md)")
    return found[0]


def hardware_label(hw: dict[str, Any] | None) -> str:
    """'NVIDIA H100 80GB HBM3 x 8', 'CPU (x86_64)', or 'hardware not recorded'."""
    if not hw:
        return "hardware not recorded"
    gpus = hw.get("gpus") or []
    if hw.get("gpu"):
        return str(hw["gpu"]) + (f" x {len(gpus)}" if len(gpus) > 1 else "")
    cpu = hw.get("cpu") or hw.get("machine")
    return f"CPU ({cpu})" if cpu else "CPU"


def _state_ledgers(engine: Path) -> list[Path]:
    """Ledgers of forge runs in <repo>/.git/forge/*/ (filtered by run id later)."""
    try:
        import git

        repo = git.Repo(engine, search_parent_directories=True)
        common = (Path(repo.working_tree_dir) / repo.git.rev_parse("--git-common-dir")).resolve()  # it may be relative
    except Exception:  # noqa: BLE001 - not a git checkout: fewer sources
        return []
    return sorted((common / "forge").glob("*/ledger.jsonl"))


def registry_ops(engine: Path, package: str) -> tuple[list[dict[str, Any]], str | None]:
    """The engine's op registry from `python -m PKG info` (implementations, defaults per device)."""
    try:
        r = launcher.run([sys.executable, "-m", package, "info"], env={"PYTHONPATH": str(engine / "src"),
                         "PATH": "/usr/bin:/bin"}, timeout_s=120)
    except OSError as e:
        return [], f"`{package} info` did not run: {e}"
    if r.timed_out:
        return [], f"`{package} info` did not run: timed out after 120 s"
    if r.returncode != 0:
        return [], f"`{package} info` exited {r.returncode}"
    impls: dict[str, list[str]] = {}
    defaults: dict[str, dict[str, str]] = {}
    for line in r.stdout.splitlines():
        if line.startswith("op ") and ":" in line:
            name, _, rest = line[3:].partition(":")
            impls[name.strip()] = [x.strip() for x in rest.split(",") if x.strip()]
        elif line.startswith("device defaults:"):
            try:
                defaults = ast.literal_eval(line.partition(":")[2].strip())
            except (ValueError, SyntaxError):
                defaults = {}
    def default(d: dict, op: str, names: list[str]) -> str:
        v = d.get(op) or ("reference" if "reference" in names else names[0])
        return " > ".join(v) if isinstance(v, (list, tuple)) else str(v)  # a preference order: the first that runs

    rows = [{"op": op, "implementations": names, **{f"default_{dev}": default(d, op, names) for dev, d in defaults.items()}}
            for op, names in impls.items()]
    return rows, None if rows else f"`{package} info` lists no op registry (no `op NAME: ...` lines)"


def benchmark_rows(path: Path) -> list[dict[str, Any]]:
    """Every object in a results JSON that has tokens_per_s, labelled by its stack name and the device the file
    records (a comparison's hardware.device_name, an engine bench's device)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    top = doc.get("hardware", {}).get("device_name") if isinstance(doc, dict) and isinstance(doc.get("hardware"), dict) else None
    top = top or (doc.get("device") if isinstance(doc, dict) else None)
    rows: list[dict[str, Any]] = []

    def walk(node: Any, label: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("tokens_per_s"), (int, float)):
                rows.append({"file": path.name, "stack": str(node.get("stack") or node.get("name") or label or path.stem),
                             "device": str(node.get("device_name") or node.get("device") or top or "device not recorded"),
                             "tokens_per_s": node.get("tokens_per_s"), "mfu": node.get("mfu"),
                             "step_time_s": node.get("step_time_s", node.get("step_s")),
                             "peak_mem_gib": node.get("peak_mem_gib", node.get("peak_gib"))})
                return
            for k, v in node.items():
                walk(v, f"{label}.{k}" if label else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{label}[{i}]")

    walk(doc, "")
    return rows


def read_log(path: Path) -> TrainLog:
    """A JSONL training log; its device from its records, else from a run summary JSON beside it."""
    recs = read_jsonl(path)
    device = next((str(r["device"]) for r in recs if r.get("device")), None)
    for f in [] if device else sorted(path.parent.glob("*summary*.json")):
        try:
            device = json.loads(f.read_text()).get("device") or None
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if device:
            break
    return TrainLog(str(path), str(device or "device not recorded"),
                    [r for r in recs if "step" in r and isinstance(r.get("loss"), (int, float))],
                    [r for r in recs if "step" in r and isinstance(r.get("eval_loss"), (int, float))])


def case_label(g: dict[str, Any]) -> str:
    """What a recorded gate ran: its case and dtype, the tensor-parallel degree and data-parallel size when set
    (`minicpm4-8b-reduced float32 TP=2 DP=2`: each of 2 data-parallel ranks was 2 processes)."""
    words = [str(g.get("case") or "-")] + ([str(g["dtype"])] if g.get("dtype") else [])
    if (g.get("tp") or 1) > 1:
        words.append(f"TP={g['tp']}")
    if g.get("world_size"):
        words.append(f"DP={g['world_size']}")
    return " ".join(words)


def gate_rows(manifest: dict[str, Any], engine: Path) -> list[dict[str, Any]]:
    """manifest.json's gates as rows; an accepted `unsupported` reads `passed (PART unsupported)` (the parts from
    the manifest, else from the gate's report the engine carries)."""
    rows = []
    for name, g in (manifest.get("gates") or {}).items():
        verdict = str(g.get("verdict", "-"))
        unsupported = g.get("unsupported") or {}
        if verdict == "unsupported" and not unsupported:
            unsupported = unsupported_parts(engine / g["report"] if g.get("report") else None) or {"some part": ""}
        rows.append({"gate": name, "verdict": accepted_label(verdict, unsupported), "why": unsupported,
                     "metrics": g.get("metrics") or {}, "hardware": hardware_label(g.get("hardware")),
                     "case": case_label(g),
                     "commit": str(g.get("commit") or "-")[:10], "report": g.get("report")})
    return rows


def _rounds(engine: Path, manifest: dict[str, Any], ledgers: list[Path]) -> tuple[list[dict[str, Any]], str | None]:
    """Rounds of the run that wrote the manifest, plus every round of the ledgers given."""
    run_id = (manifest.get("forge") or {}).get("run_id")
    out, seen = [], set()
    sources = [(p, None) for p in ledgers] + [(p, run_id) for p in [engine / "forge" / "ledger.jsonl", *_state_ledgers(engine)]]
    for path, want in sources:
        if (want is None and path not in ledgers) or not Path(path).is_file():
            continue
        for rec in Ledger(Path(path)).rounds():
            key = (rec.run_id, rec.stage, rec.op, rec.round)
            if key not in seen and (want is None or rec.run_id == want):
                seen.add(key)
                out.append(rec.model_dump(mode="json"))
    out.sort(key=lambda r: r["ts"])
    certified = [g for g in (manifest.get("gates") or {}).values() if g.get("by") == "certify"]
    if out or ledgers:
        note = None
    elif run_id:
        note = f"forge run {run_id}: its ledger is not here"
    elif certified:
        commits = ", ".join(sorted({str(g.get("commit"))[:10] for g in certified}))
        note = f"gates recorded by `certify` (commit {commits}): no forge run, no forge history"
    else:
        note = "manifest.json records no forge run: no forge history"
    return out, note


CODE_PATHS = ("src", "pyproject.toml")  # what the gates judge: the package and its dependencies, not docs or tests


def code_changed_since(engine: Path, commit: str) -> list[str] | None:
    """The engine's code files (CODE_PATHS) that differ in the working tree from `commit`, untracked ones included;
    None when that cannot be told (not a git checkout, an unknown commit)."""
    engine = engine.resolve()
    try:
        import git

        repo = git.Repo(engine, search_parent_directories=True)
        paths = [str(engine / p) for p in CODE_PATHS if (engine / p).exists()]
        changed = repo.git.diff("--name-only", commit, "--", *paths).splitlines()
        changed += repo.git.ls_files("--others", "--exclude-standard", "--", *paths).splitlines()
    except Exception:  # noqa: BLE001 - not a checkout, or the commit is not in it: nothing to compare with
        return None
    root = Path(repo.working_tree_dir)  # git names files from there; each lies under `engine` (the paths asked)
    return sorted({(root / f).resolve().relative_to(engine).as_posix() for f in changed if f})


def _shown_path(path: Path) -> str:
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def drift_notes(engine: Path, manifest: dict[str, Any]) -> list[str]:
    """One note per commit the manifest's gates judged whose code is no longer the engine's: those verdicts are
    about other code until `certify` (or a forge round) judges this one."""
    by_commit: dict[str, list[str]] = {}
    for name, g in (manifest.get("gates") or {}).items():
        if g.get("commit"):
            by_commit.setdefault(str(g["commit"]), []).append(name)
    spec = (manifest.get("spec") or {}).get("path")
    rerun = f"bash agent-loop.sh certify {f'--spec {spec} ' if spec else ''}--engine {_shown_path(engine)}"
    notes = []
    for commit, gates in sorted(by_commit.items()):
        changed = code_changed_since(engine, commit)
        if changed is None:
            notes.append(f"gates judged commit {commit[:10]}, which this checkout cannot compare with: "
                         "whether they judged this code is unknown")
        elif changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            notes.append(f"the engine's code changed since commit {commit[:10]}, which {', '.join(sorted(gates))} "
                         f"judged: {len(changed)} file(s) ({shown}); `{rerun}` judges this code")
    return notes


def collect(engine: Path, *, ledgers: list[Path] = (), logs: list[Path] = (), bench: list[Path] = (),
            probe_ops: bool = True) -> Inspection:
    """Raises NotAnEngine for a folder that is not an engine."""
    engine = engine.resolve()
    package = engine_package(engine)
    ins = Inspection(engine=str(engine))
    spec_file = engine / "model_spec.toml"
    if spec_file.is_file():
        data = tomllib.loads(spec_file.read_text())
        ins.model, ins.engine_info = data.get("model", {}), data.get("engine", {})
        listed = data.get("ops") or data.get("engine", {}).get("ops")
        if isinstance(listed, dict):
            ins.ops = [{"op": k, "selected": v} for k, v in listed.items()]
    else:
        ins.notes.append("no model_spec.toml")
    if probe_ops and not ins.ops:
        ins.ops, note = registry_ops(engine, ins.engine_info.get("package") or package)
        if note:
            ins.notes.append(note)
    if (engine / "manifest.json").is_file():
        try:
            ins.manifest = json.loads((engine / "manifest.json").read_text())
        except json.JSONDecodeError:
            ins.notes.append("manifest.json is not valid JSON")
    else:
        ins.notes.append("no manifest.json")
    ins.gates = gate_rows(ins.manifest, engine)
    ins.notes += drift_notes(engine, ins.manifest)
    if not ins.gates:
        ins.notes.append("no gate recorded in manifest.json: this engine has not been forged or certified here "
                         "(`bash agent-loop.sh certify --engine ...` runs the gates and records them)")
    ins.rounds, note = _rounds(engine, ins.manifest, [Path(p) for p in ledgers])
    if note:
        ins.notes.append(note)
    for f in bench:
        rows = benchmark_rows(Path(f))
        ins.benchmarks += rows
        if not rows:
            ins.notes.append(f"{f}: no result with tokens_per_s")
    for log in logs:
        t = read_log(Path(log))
        if t.steps or t.evals:
            ins.train_logs.append(t)
        else:
            ins.notes.append(f"{log}: no step/loss lines")
    return ins


PREFERRED = ("loss.window_mean_rel_diff", "mfu.mfu", "worst_tensor", "worst_rel", "worst_max_rel", "error_type")


def key_numbers(metrics: dict[str, Any], n: int = 3) -> list[tuple[str, Any]]:
    """The numbers a reader wants first: M5's statistics where there are (the loss window's mean and the MFU decide
    it, not its worst single step), then the worst tensor and its errors."""
    first = [(k, metrics[k]) for k in PREFERRED if k in metrics]
    return (first + [(k, v) for k, v in metrics.items() if k not in PREFERRED])[:n]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def write(ins: Inspection, out_dir: Path) -> dict[str, Path]:
    from harness.inspection_report import markdown, plot

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "loss_mfu.png"}
    paths["json"].write_text(json.dumps(asdict(ins), indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(ins))
    plot(ins, paths["png"])
    return paths
