"""`bash agent-loop.sh inspect ENGINE`: what the engine is and what it has proven.

Prints the model and engine spec, the op registry, the gates manifest.json records (numbers, hardware, commit)
and the forge run that wrote it; with --log, training curves (train and eval loss); with --bench, the result
files named. Writes report.json, report.md and loss_mfu.png to --out (default: runs/inspect/<engine>/ under the
workspace, which git ignores). A folder that is not an engine is refused (exit 2), and nothing is written.
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
        t.add_column(c, overflow="fold")  # wrapped, never cut with an ellipsis
    for r in rows:
        t.add_row(*r)
    out.print(t)


def show(ins, out: Console) -> None:  # noqa: ANN001 - harness.inspection.Inspection
    from harness.gating import round_label
    from harness.inspection import _fmt, key_numbers

    out.print(f"[bold]{Path(ins.engine).name}[/]  {ins.engine}")
    if ins.model:
        out.print("model: " + ", ".join(f"{k}={v}" for k, v in ins.model.items()))
    if ins.ops:
        cols = sorted({k for r in ins.ops for k in r} - {"op"})
        _print_table(out, "ops", ["op", *cols],
                     [[r["op"], *[", ".join(r[c]) if isinstance(r.get(c), list) else _fmt(r.get(c)) for c in cols]]
                      for r in ins.ops])
    m = ins.manifest
    _print_table(out, f"gates (manifest.json; commit {_fmt(m.get('commit'))[:10]})",
                 ["gate", "verdict", "key numbers", "case", "hardware", "commit"],
                 [[g["gate"], g["verdict"], ", ".join(f"{k}={_fmt(v)}" for k, v in key_numbers(g["metrics"], 3)),
                   g["case"], g["hardware"], g["commit"]] for g in ins.gates])  # printed even when empty
    for g in ins.gates:
        for part, why in g["why"].items():
            if why:
                out.print(f"  {g['gate']} {part} unsupported: {why}", highlight=False)
    if ins.rounds:
        _print_table(out, "forge history (the run that wrote manifest.json)",
                     ["stage", "round", "backend", "verdict", "tokens", "cost $", "wall s", "commit"],
                     [[r.get("stage", "") + (f"-{r['op']}" if r.get("op") else ""), str(r.get("round")),
                       str(r.get("backend")), round_label(str(r.get("verdict")), r.get("gates") or []),
                       str((r.get("tokens_in") or 0) + (r.get("tokens_out") or 0)), _fmt(r.get("cost_usd")),
                       _fmt(r.get("wall_s")), str(r.get("commit") or "-")[:10]] for r in ins.rounds])
    if ins.benchmarks:
        _print_table(out, "benchmarks (--bench)", ["file", "stack", "device", "tokens/s", "MFU", "step s", "peak GiB"],
                     [[b["file"], b["stack"], b["device"], _fmt(b["tokens_per_s"]), _fmt(b["mfu"]),
                       _fmt(b["step_time_s"]), _fmt(b["peak_mem_gib"])] for b in ins.benchmarks])
    for t in ins.train_logs:
        text = f"training log {t.path} ({t.device}): "
        if t.steps:
            text += f"{len(t.steps)} steps, loss {_fmt(t.steps[0]['loss'])} -> {_fmt(t.steps[-1]['loss'])}"
        if t.evals:
            text += f"; eval loss {_fmt(t.evals[0]['eval_loss'])} -> {_fmt(t.evals[-1]['eval_loss'])} ({len(t.evals)} evals)"
        out.print(text, highlight=False)
    for n in ins.notes:
        out.print(f"[yellow]note:[/] {n}")


def main(
    engine: Path = typer.Argument(..., help="the engine directory (exports/<engine>)"),
    out: Optional[Path] = typer.Option(None, "--out", help="report directory (default runs/inspect/<engine>)"),
    log: list[Path] = typer.Option([], "--log", help="training log (JSONL) to plot, train and eval loss; repeatable"),
    bench: list[Path] = typer.Option([], "--bench", help="a benchmark result JSON of this engine to show; repeatable"),
    ledger: list[Path] = typer.Option([], "--ledger", help="a forge ledger whose rounds to show too; repeatable"),
    ops: bool = typer.Option(True, "--ops/--no-ops", help="ask the engine's `info` for its op registry"),
) -> None:
    """Show what an engine is and what it has proven; write report.json, report.md and loss_mfu.png."""
    from harness.inspection import NotAnEngine, collect, write
    from harness.prompts import WORKSPACE_ROOT

    try:
        ins = collect(engine, ledgers=list(ledger), logs=list(log), bench=list(bench), probe_ops=ops)
    except NotAnEngine as e:
        console.print(f"[red]error:[/] {e}; nothing written")
        raise typer.Exit(2)
    show(ins, Console())
    paths = write(ins, out or WORKSPACE_ROOT / "runs" / "inspect" / engine.resolve().name)
    console.print(f"report: {paths['md']}  plot: {paths['png']}")
