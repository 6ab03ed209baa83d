"""What an engine is and what it has proven, gathered from the files that say so (`inspect ENGINE`).

- identity: `model_spec.toml` ([model], [engine], and [ops] when the engine lists one); the op registry
  from the engine's own `info` command (implementations, the default per device);
- evidence: `manifest.json` (gates passed with numbers, hardware, commit; elected ops);
- history: forge ledgers (the copy committed in `forge/ledger.jsonl`, the run state dirs under
  `<repo>/.git/forge/`, and any given), benchmark results (`<repo>/benchmarks/results/*.json`, any
  shape: every object with `tokens_per_s` is a row), training logs (JSONL lines with `step` and `loss`).

`write` saves report.json, report.md and loss_mfu.png (matplotlib, Agg) into one directory.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.ledger import read_jsonl


@dataclass
class Inspection:
    engine: str
    model: dict[str, Any] = field(default_factory=dict)
    engine_info: dict[str, Any] = field(default_factory=dict)
    ops: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    gate_reports: list[dict[str, Any]] = field(default_factory=list)  # committed runs, benchmarks/results/gates
    rounds: list[dict[str, Any]] = field(default_factory=list)
    benchmarks: list[dict[str, Any]] = field(default_factory=list)
    train_logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def repo_root(engine: Path) -> Path | None:
    try:
        import git

        return Path(git.Repo(engine, search_parent_directories=True).working_tree_dir).resolve()
    except Exception:  # noqa: BLE001 - not a git checkout: fine, fewer sources
        return None


def _state_ledgers(engine: Path) -> list[Path]:
    """Ledgers of forge runs on this engine in <repo>/.git/forge/*/."""
    try:
        import git

        common = Path(git.Repo(engine, search_parent_directories=True).git.rev_parse("--git-common-dir")).resolve()
    except Exception:  # noqa: BLE001
        return []
    found = []
    for run in sorted((common / "forge").glob("*/run.json")):
        try:
            if Path(json.loads(run.read_text()).get("engine", "")).resolve() == engine.resolve():
                found.append(run.parent / "ledger.jsonl")
        except (OSError, json.JSONDecodeError):
            continue
    return found


def registry_ops(engine: Path, package: str) -> tuple[list[dict[str, Any]], str | None]:
    """The engine's op registry from `python -m PKG info` (implementations, defaults per device)."""
    try:
        r = subprocess.run([sys.executable, "-m", package, "info"], env={"PYTHONPATH": str(engine / "src"),
                           "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"`{package} info` did not run: {e}"
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
    rows = [{"op": op, "implementations": names,
             **{f"default_{dev}": (d.get(op) or ("reference" if "reference" in names else names[0]))
                for dev, d in defaults.items()}} for op, names in impls.items()]
    return rows, None


def benchmark_rows(path: Path) -> list[dict[str, Any]]:
    """Every object in a results JSON that has tokens_per_s, labelled by its stack name or JSON path."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    rows: list[dict[str, Any]] = []

    def walk(node: Any, label: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("tokens_per_s"), (int, float)):
                name = node.get("stack") or node.get("name") or label or path.stem
                rows.append({"file": path.name, "stack": str(name), "tokens_per_s": node.get("tokens_per_s"),
                             "mfu": node.get("mfu"), "step_time_s": node.get("step_time_s", node.get("step_s")),
                             "peak_mem_gib": node.get("peak_mem_gib", node.get("peak_gib"))})
                return
            for k, v in node.items():
                walk(v, f"{label}.{k}" if label else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{label}[{i}]")

    walk(doc, "")
    return rows


def collect(engine: Path, *, ledgers: list[Path] = (), logs: list[Path] = (), bench_dir: Path | None = None,
            probe_ops: bool = True) -> Inspection:
    engine = engine.resolve()
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
    package = ins.engine_info.get("package") or next((p.name for p in (engine / "src").glob("*") if p.is_dir()
                                                      and not p.name.endswith(".egg-info")), None)
    if probe_ops and package and not ins.ops:
        ins.ops, note = registry_ops(engine, package)
        if note:
            ins.notes.append(note)
    if (engine / "manifest.json").is_file():
        try:
            ins.manifest = json.loads((engine / "manifest.json").read_text())
        except json.JSONDecodeError:
            ins.notes.append("manifest.json is not valid JSON")
    seen = set()
    for path in [*_state_ledgers(engine), *ledgers, engine / "forge" / "ledger.jsonl"]:  # full records first
        if not Path(path).is_file():
            continue
        for rec in read_jsonl(Path(path)):
            key = (rec.get("run_id"), rec.get("stage"), rec.get("op"), rec.get("round"))
            if rec.get("kind") == "round" and key not in seen:
                seen.add(key)
                ins.rounds.append(rec)
    ins.rounds.sort(key=lambda r: r.get("ts", 0))
    root = repo_root(engine)
    bench_dir = bench_dir or (root / "benchmarks" / "results" if root else None)
    if bench_dir and bench_dir.is_dir():
        for f in sorted(bench_dir.glob("*.json")):
            ins.benchmarks += benchmark_rows(f)
        ins.gate_reports = gate_report_rows(bench_dir / "gates", engine.name)
    for log in logs:
        recs = [r for r in read_jsonl(Path(log)) if "step" in r and "loss" in r]
        if recs:
            ins.train_logs[str(log)] = recs
        else:
            ins.notes.append(f"{log}: no step/loss lines")
    return ins


def gate_report_rows(gates_dir: Path, engine_name: str) -> list[dict[str, Any]]:
    """One row per committed gate report of this engine: `gates_dir/<run>/<engine_name>/<gate>.json`
    (what `gate ... --out` writes, e.g. the GPU runs of benchmarks/gpu/gates_0.5b.sh); bad files are skipped."""
    rows = []
    for f in sorted(gates_dir.glob(f"*/{engine_name}/*.json")):
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(r, dict) or "gate" not in r or "verdict" not in r:
            continue
        hw, case = r.get("hardware") or {}, r.get("case") or {}
        rows.append({"run": f.parent.parent.name, "gate": r["gate"], "verdict": r["verdict"],
                     "message": str(r.get("message") or "")[:160], "hardware": hw.get("gpu") or hw.get("cpu") or "-",
                     "case": case.get("source") or case.get("label") or "-", "reference": r.get("reference", "-"),
                     "ops": proved_ops(r)})
    return rows


def proved_ops(report: dict[str, Any]) -> str:
    """The op implementations a gate report's engine probe ran, other than the plain ones ("reference",
    "unfused", or a part "(in <fused op>)"), as "op=impl, ..." from its `engine_metrics` (gates record each
    probe's metrics.json there); "-" for reports without them (older ones, or an engine that names no ops)."""
    for metrics in (report.get("engine_metrics") or {}).values():
        ops = metrics.get("ops") if isinstance(metrics, dict) else None
        if isinstance(ops, dict):
            chosen = [f"{op}={impl}" for op, impl in sorted(ops.items())
                      if isinstance(impl, str) and impl not in ("reference", "unfused") and not impl.startswith("(in ")]
            return ", ".join(chosen) or "reference"
    return "-"


PREFERRED = ("worst_tensor", "worst_rel", "worst_max_rel", "loss.window_mean_rel_diff", "mfu.mfu", "error_type")


def key_numbers(metrics: dict[str, Any], n: int = 3) -> list[tuple[str, Any]]:
    """The numbers a reader wants first: the worst tensor and its errors, M5's loss statistic and MFU."""
    first = [(k, metrics[k]) for k in PREFERRED if k in metrics]
    return (first + [(k, v) for k, v in metrics.items() if k not in PREFERRED])[:n]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown(ins: Inspection) -> str:
    m = ins.manifest
    lines = [f"# {Path(ins.engine).name}", "", f"Engine: `{ins.engine}`", ""]
    if ins.model:
        lines += ["## Model", "", ", ".join(f"{k} {v}" for k, v in ins.model.items()), ""]
    if ins.engine_info:
        lines += [", ".join(f"{k}: {v}" for k, v in ins.engine_info.items() if not isinstance(v, dict)), ""]
    if ins.ops:
        cols = sorted({k for r in ins.ops for k in r} - {"op"})
        lines += ["## Ops", "", "| op | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += ["| " + " | ".join([r["op"]] + [", ".join(r[c]) if isinstance(r.get(c), list) else _fmt(r.get(c))
                                              for c in cols]) + " |" for r in ins.ops]
        lines.append("")
    spec = m.get("spec") or {}
    lines += ["## Gates passed (manifest.json)", "", f"spec: {spec.get('name', '-')} ({spec.get('path', '-')}), "
              f"reference {spec.get('reference', '-')}, commit {_fmt(m.get('commit'))}", ""]
    gates = m.get("gates") or {}
    if gates:
        lines += ["| gate | verdict | key numbers | hardware | commit |", "|---|---|---|---|---|"]
        for name, g in gates.items():
            hw = g.get("hardware") or {}
            nums = ", ".join(f"{k}={_fmt(v)}" for k, v in key_numbers(g.get("metrics") or {}, 5))
            lines.append(f"| {name} | {g.get('verdict')} | {nums} | {hw.get('gpu') or hw.get('cpu') or '-'} | "
                         f"{str(g.get('commit', '-'))[:10]} |")
    else:
        lines.append("no gate recorded")
    if ins.gate_reports:
        lines += ["", "## Gate reports committed under benchmarks/results/gates", "",
                  "| run | gate | verdict | reference | hardware | ops proved | message |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['gate']} | {r['verdict']} | {r['reference']} | {r['hardware']} | {r.get('ops', '-')} | "
                  f"{r['message']} |" for r in ins.gate_reports]
    for op, o in (m.get("ops") or {}).items():
        lines.append(f"- op {op}: {o.get('metric')} {_fmt(o.get('value'))} (baseline {_fmt(o.get('baseline'))})")
    lines += ["", "## Forge history", ""]
    if ins.rounds:
        lines += ["| stage | round | backend | verdict | tokens in/out | cost $ | wall s | commit |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ins.rounds:
            key = r.get("stage", "") + (f"-{r['op']}" if r.get("op") else "")
            lines.append(f"| {key} | {r.get('round')} | {r.get('backend')} | {r.get('verdict')} | "
                         f"{_fmt(r.get('tokens_in'))}/{_fmt(r.get('tokens_out'))} | {_fmt(r.get('cost_usd'))} | "
                         f"{_fmt(r.get('wall_s'))} | {str(r.get('commit') or '-')[:10]} |")
    else:
        lines.append("no forge ledger found")
    lines += ["", "## Benchmarks", ""]
    if ins.benchmarks:
        lines += ["| file | stack | tokens/s | MFU | step s | peak GiB |", "|---|---|---|---|---|---|"]
        lines += [f"| {b['file']} | {b['stack']} | {_fmt(b['tokens_per_s'])} | {_fmt(b['mfu'])} | "
                  f"{_fmt(b['step_time_s'])} | {_fmt(b['peak_mem_gib'])} |" for b in ins.benchmarks]
    else:
        lines.append("no benchmark results found")
    for log, recs in ins.train_logs.items():
        lines += ["", f"## Training log `{log}`", "",
                  f"{len(recs)} steps; loss {_fmt(recs[0]['loss'])} -> {_fmt(recs[-1]['loss'])}; "
                  f"last MFU {_fmt(recs[-1].get('mfu'))}; tokens/s {_fmt(recs[-1].get('tokens_per_s'))}"]
    if ins.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in ins.notes]
    return "\n".join(lines) + "\n"


def plot(ins: Inspection, path: Path) -> bool:
    """Loss curve(s) and MFU per step from the training logs; benchmark MFUs as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mfu) = plt.subplots(1, 2, figsize=(11, 4))
    peak = 0.0
    for log, recs in ins.train_logs.items():
        steps = [r["step"] for r in recs]
        ax_loss.plot(steps, [r["loss"] for r in recs], label=Path(log).name)
        mfu = [r.get("mfu") for r in recs]
        if any(isinstance(x, (int, float)) for x in mfu):
            ax_mfu.plot(steps, [100 * x if isinstance(x, (int, float)) else float("nan") for x in mfu],
                        label=Path(log).name)
            peak = max([peak] + [x for x in mfu if isinstance(x, (int, float))])
    bench = sorted((b for b in ins.benchmarks if isinstance(b.get("mfu"), (int, float))), key=lambda b: -b["mfu"])[:8]
    if peak >= 0.01:      # GPU-scale training MFU: the benchmarks' MFUs are reference lines on the same axis
        for b in bench:
            ax_mfu.axhline(100 * b["mfu"], linestyle=":", linewidth=0.8, color="gray")
        mfu_title = "MFU per step (%; dotted: benchmark results)"
    elif bench:           # CPU training (MFU ~0): show the benchmark results on their own
        ax_mfu.cla()
        ax_mfu.barh([b["stack"][-28:] for b in bench], [100 * b["mfu"] for b in bench], color="tab:gray")
        ax_mfu.invert_yaxis()
        ax_mfu.tick_params(axis="y", labelsize=7)
        mfu_title = "MFU of benchmark results (%)" + (" (training MFU ~0: CPU)" if peak else "")
    else:
        mfu_title = "MFU per step (%)"
    ax_loss.set(title="loss", xlabel="step", ylabel="loss")
    ax_mfu.set(title=mfu_title, xlabel="MFU %" if bench and peak < 0.01 else "step",
               ylabel="" if bench and peak < 0.01 else "MFU %")
    for ax in (ax_loss, ax_mfu):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(Path(ins.engine).name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(ins: Inspection, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "loss_mfu.png"}
    paths["json"].write_text(json.dumps(asdict(ins), indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(ins))
    plot(ins, paths["png"])
    return paths
