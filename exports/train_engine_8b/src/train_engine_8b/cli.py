"""The engine's command line (typer): pretrain, probe, export-hf, dump-state, prepare-data, info. Thin: each command maps its options to
a config or call; errors are one line and a non-zero exit (core/cli_guard.py). Run under torchrun for more than
one process; `--tp N` makes every N consecutive ranks one tensor-parallel model replica."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from train_engine_8b.core import cli_commands
from train_engine_8b.core.cli_guard import guard
from train_engine_8b.core.cli_options import with_config_options
from train_engine_8b.core.errors import EngineError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MiniCPM4-8B pretraining engine (tensor parallel x data parallel; run under torchrun).")
DEFAULT_MODEL = "minicpm4-8b"  # `minicpm4-8b-reduced` runs the same per-head shapes on a CPU


def _model(spec: str | None, init_from: Path | None):
    """--model, else --init-from's config.json, else the engine's model."""
    from train_engine_8b.model_config import load

    if spec is None and init_from is not None:
        if not (init_from / "config.json").is_file():
            raise EngineError(f"--init-from {init_from}: no config.json (expected a Hugging Face MiniCPM checkpoint directory)")
        return load(init_from / "config.json")
    return load(spec or DEFAULT_MODEL)


@app.command()
@with_config_options
@guard
def pretrain(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help=f"preset (minicpm4-8b, minicpm4-8b-reduced) or HF config.json; default: --init-from's config.json, else {DEFAULT_MODEL}"),
    ops: str = typer.Option("", "--ops", help="op=implementation pairs (this engine runs the registry's adamw only)"),
    summary_json: Optional[Path] = typer.Option(None, "--summary-json", help="write the run summary here (rank 0)"),
    **options,
) -> None:
    """Train (and with --resume, continue from the latest checkpoint, at any --tp and world size)."""
    from train_engine_8b import config as config_mod, pretrain as pretrain_mod
    from train_engine_8b.core import cli_options
    from train_engine_8b.ops.registry import OpSelection

    sections = cli_options.sections(options, {}, cli_options.given(ctx))
    init_from = sections["checkpoint"].get("init_from")
    model_cfg = _model(model, Path(init_from) if init_from is not None else None)
    cfg = config_mod.build(model=model_cfg, ops=OpSelection.parse(ops), **sections)
    summary = pretrain_mod.run(cfg)
    if summary_json is not None and int(os.environ.get("RANK", 0)) == 0:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2) + "\n")


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


app.command("export-hf")(cli_commands.export_hf)  # one unsharded HF checkpoint from any layout, read whole
app.command("dump-state")(cli_commands.dump_state)
app.command("prepare-data")(cli_commands.prepare_data)


@app.command()
def info() -> None:
    """Presets and environment switches."""
    from train_engine_8b.core import env
    from train_engine_8b.model_config import PRESETS

    typer.echo(f"presets: {', '.join(PRESETS)} (default {DEFAULT_MODEL})")
    typer.echo((env.__doc__ or "").strip())
