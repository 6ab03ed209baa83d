"""The engine's command line (typer): pretrain, prepare-data, bench, probe, export-hf, info. Thin: each command maps
its options to a config or call and turns EngineError into a message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from train_engine_0_5b.cli_help import PlainHelpGroup
from train_engine_0_5b.core import cli_commands
from train_engine_0_5b.core.cli_guard import guard
from train_engine_0_5b.core.cli_options import with_config_options
from train_engine_0_5b.model_config import PRESETS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=PlainHelpGroup,
                  help="MiniCPM4-0.5B pretraining engine (data parallel; run under torchrun for more than one process).")
DEFAULT_MODEL = "minicpm4-0.5b"  # model_spec.toml's [model]; `tiny` runs the same math on a CPU


_guard = guard  # core/cli_guard.py: EngineError -> one line and exit 1, Unsupported -> exit 77


def _ops(text: str):
    from train_engine_0_5b.ops.registry import OpSelection

    return OpSelection.parse(text)


@app.command()
@with_config_options
@_guard
def pretrain(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help="a run config (TOML: model, ops and the sections train, "
                                          "optim, data, checkpoint, runtime); options given here override it"),
    model: Optional[str] = typer.Option(None, "--model", help=f"preset (minicpm4-0.5b, tiny), model .toml or HF config.json; default: --init-from's config.json, else {DEFAULT_MODEL}"),
    ops: str = typer.Option("", "--ops", help="op=implementation pairs, comma-separated (e.g. attention=sdpa); `info` lists them"),
    summary_json: Optional[Path] = typer.Option(None, "--summary-json", help="write the run summary here (rank 0)"),
    **options,
) -> None:
    """Train (and with --resume, continue bit-identically from the latest checkpoint)."""
    from train_engine_0_5b import pretrain as pretrain_mod

    cfg = cli_commands.pretrain_config(ctx, config, model, ops, options, PRESETS, DEFAULT_MODEL)
    cli_commands.write_summary(pretrain_mod.run(cfg), summary_json)


def _engine():
    from train_engine_0_5b.pretrain import ENGINE

    return ENGINE


def _op_table():
    from train_engine_0_5b.core.op_table import OpTable
    from train_engine_0_5b.op_table import step_ops

    return OpTable(step_ops)


app.command("bench")(cli_commands.bench_command(_engine, PRESETS, DEFAULT_MODEL, op_table=_op_table))


@app.command()
@_guard
def probe(
    name: str = typer.Argument(..., help="forward | backward | steps | checkpoint"),
    case: Path = typer.Option(..., "--case", help="case directory"),
    out: Path = typer.Option(..., "--out", help="output directory"),
    ops: str = typer.Option("", "--ops", help="op=implementation,... (default: the device's defaults)"),
) -> None:
    """Answer one probe of the probe contract on a case (exit 77 when unsupported)."""
    from train_engine_0_5b.probe import run_probe

    run_probe(name, case, out, _ops(ops))


app.command("export-hf")(cli_commands.export_hf)
app.command("dump-state")(cli_commands.dump_state)
app.command("prepare-data")(cli_commands.prepare_data)


app.command("info")(cli_commands.info_command(PRESETS, DEFAULT_MODEL))
