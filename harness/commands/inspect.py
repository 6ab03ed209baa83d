"""`bash agent-loop.sh inspect ENGINE`: what the engine is and what it has proven.

Prints the model and engine spec, the op registry, the gates passed (numbers, hardware, commit), the
forge history and the benchmark history; writes report.json, report.md and loss_mfu.png to --out
(default: runs/inspect/<engine>/ under the workspace, which git ignores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from harness.commands._common import console


def _print_table(out: Console, title: str, columns: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    out.print(t)


def show(ins, out: Console) -> None:  # noqa: ANN001 - harness.inspection.Inspection
    from harness.inspection import _fmt, key_numbers

    out.print(f"[bold]{Path(ins.engine).name}[/]  {ins.engine}")
    if ins.model:
        out.print("model: " + ", ".join(f"{k}={v}" for k, v in ins.model.items()))
    if ins.engine_info:
        out.print("engine: " + ", ".join(f"{k}={v}" for k, v in ins.engine_info.items() if not isinstance(v, dict)))
    if ins.ops:
        cols = sorted({k for r in ins.ops for k in r} - {"op"})
        _print_table(out, "ops", ["op", *cols],
                     [[r["op"], *[", ".join(r[c]) if isinstance(r.get(c), list) else _fmt(r.get(c)) for c in cols]]
                      for r in ins.ops])
    m = ins.manifest
    rows = []
    for name, g in (m.get("gates") or {}).items():
        hw = g.get("hardware") or {}
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in key_numbers(g.get("metrics") or {}, 3))
        rows.append([name, g.get("verdict", "-"), nums, str(hw.get("gpu") or hw.get("cpu") or "-"),
                     str(g.get("commit") or "-")[:10]])
    _print_table(out, f"gates (manifest.json; commit {_fmt(m.get('commit'))[:10]})",
                 ["gate", "verdict", "key numbers", "hardware", "commit"], rows)  # printed even when empty
    if ins.gate_reports:
        _print_table(out, "gate reports (benchmarks/results/gates)",
                     ["run", "gate", "verdict", "reference", "hardware", "message"],
                     [[r["run"], r["gate"], r["verdict"], str(r["reference"]), r["hardware"], r["message"]]
                      for r in ins.gate_reports])
    if ins.rounds:
        rows = []
        for r in ins.rounds:
            key = r.get("stage", "") + (f"-{r['op']}" if r.get("op") else "")
            tokens = (r.get("tokens_in") or 0) + (r.get("tokens_out") or 0)
            rows.append([key, str(r.get("round")), str(r.get("backend")), str(r.get("verdict")), str(tokens),
                         _fmt(r.get("cost_usd")), _fmt(r.get("wall_s")), str(r.get("commit") or "-")[:10]])
        _print_table(out, "forge history", ["stage", "round", "backend", "verdict", "tokens", "cost $", "wall s", "commit"],
                     rows)
    if ins.benchmarks:
        _print_table(out, "benchmarks (benchmarks/results)", ["file", "stack", "tokens/s", "MFU", "step s", "peak GiB"],
                     [[b["file"], b["stack"], _fmt(b["tokens_per_s"]), _fmt(b["mfu"]), _fmt(b["step_time_s"]),
                       _fmt(b["peak_mem_gib"])] for b in ins.benchmarks])
    for log, recs in ins.train_logs.items():
        out.print(f"training log {log}: {len(recs)} steps, loss {_fmt(recs[0]['loss'])} -> {_fmt(recs[-1]['loss'])}")
    for n in ins.notes:
        out.print(f"[yellow]note:[/] {n}")


def main(
    engine: Path = typer.Argument(..., help="the engine directory (exports/<engine>)"),
    out: Optional[Path] = typer.Option(None, "--out", help="report directory (default runs/inspect/<engine>)"),
    log: list[Path] = typer.Option([], "--log", help="training log (JSONL) to plot; repeatable"),
    ledger: list[Path] = typer.Option([], "--ledger", help="extra forge ledger; repeatable"),
    ops: bool = typer.Option(True, "--ops/--no-ops", help="ask the engine's `info` for its op registry"),
) -> None:
    """Show what an engine is and what it has proven; write report.json, report.md and loss_mfu.png."""
    from harness.inspection import collect, write
    from harness.prompts import WORKSPACE_ROOT

    if not engine.is_dir():
        console.print(f"[red]error:[/] {engine} is not a directory")
        raise typer.Exit(2)
    ins = collect(engine, ledgers=list(ledger), logs=list(log), probe_ops=ops)
    show(ins, Console())
    paths = write(ins, out or WORKSPACE_ROOT / "runs" / "inspect" / engine.resolve().name)
    console.print(f"report: {paths['md']}  plot: {paths['png']}")
