"""The engine's command line (typer): pretrain, bench, probe, export-hf, dump-state, prepare-data, info. Thin: each command
maps its options to a config or call; errors are one line and a non-zero exit (core/cli_guard.py). Run under
torchrun for more than one process; `--tp N` makes every N consecutive ranks one tensor-parallel model replica."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from train_engine_8b import AUTO_UNFUSED, registry_ops
from train_engine_8b.cli_help import PlainHelpGroup
from train_engine_8b.core import cli_commands
from train_engine_8b.core.cli_guard import guard
from train_engine_8b.core.cli_options import with_config_options
from train_engine_8b.model_config import PRESETS

app = typer.Typer(cls=PlainHelpGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MiniCPM4-8B pretraining engine (tensor parallel x data parallel; run under torchrun).")
DEFAULT_MODEL = "minicpm4-8b"  # `minicpm4-8b-reduced` runs the same per-head shapes on a CPU


@app.command()
@with_config_options
@guard
def pretrain(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="a run config (TOML: model, ops and the sections train, "
                                          "optim, data, checkpoint, runtime); options given here override it"),
    model: Optional[str] = typer.Option(None, "--model", help=f"preset (minicpm4-8b, minicpm4-8b-reduced), model .toml or HF config.json; default: --init-from's config.json, else {DEFAULT_MODEL}"),
    ops: str = typer.Option("", "--ops", help="op=implementation pairs (this engine runs the registry's attention, adamw and, at --tp 1, linear_cross_entropy and mlp: build.attach_ops)"),
    summary_json: Optional[Path] = typer.Option(None, "--summary-json", help="write the run summary here (rank 0)"),
    **options,
) -> None:
    """Train (and with --resume, continue from the latest checkpoint, at any --tp and world size)."""
    from train_engine_8b import pretrain as pretrain_mod

    cfg = cli_commands.pretrain_config(ctx, config, model, ops, options, PRESETS, DEFAULT_MODEL)
    cli_commands.write_summary(pretrain_mod.run(cfg), summary_json)


@app.command()
@guard
def probe(
    name: str = typer.Argument(..., help="forward | backward | steps | checkpoint"),
    case: Path = typer.Option(..., "--case", help="case directory"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    ops: str = typer.Option("", "--ops", help="op=implementation,... (default: the device's defaults)"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel degree (the processes of one model replica)"),
) -> None:
    """Answer one probe of the probe contract on a case (exit 77 when unsupported)."""
    from train_engine_8b.ops.registry import OpSelection
    from train_engine_8b.probe import run_probe

    run_probe(name, case, out, OpSelection.parse(ops), tp)


def _engine():
    from train_engine_8b.pretrain import ENGINE

    return ENGINE


def _op_table():
    from train_engine_8b.core.op_table import OpTable
    from train_engine_8b.op_table import step_ops

    return OpTable(step_ops)


app.command("bench")(cli_commands.bench_command(_engine, PRESETS, DEFAULT_MODEL, op_table=_op_table))
app.command("export-hf")(cli_commands.export_hf)  # one unsharded HF checkpoint from any layout, read whole
app.command("dump-state")(cli_commands.dump_state)
app.command("prepare-data")(cli_commands.prepare_data)


app.command("info")(cli_commands.info_command(
    PRESETS, DEFAULT_MODEL, runs=registry_ops(1), auto_unfused=AUTO_UNFUSED,
    note=f"this engine: a fused MLP runs only when named (no election at the 8B's shapes yet); under --tp > 1 it "
         f"runs {', '.join(registry_ops(2))} only (the vocab-parallel cross-entropy and the parallel projections "
         "replace the others; naming one is an error)"))
