"""The engine's command line (typer): pretrain, prepare-data, bench, probe, export-hf, info. Thin: each command maps
its options to a config or call and turns EngineError into a message and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from train_engine_0_5b.cli_help import PlainHelpGroup
from train_engine_0_5b.core import cli_commands
from train_engine_0_5b.core.cli_guard import err, guard
from train_engine_0_5b.core.cli_options import with_config_options
from train_engine_0_5b.core.errors import EngineError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=PlainHelpGroup,
                  help="MiniCPM4-0.5B pretraining engine (data parallel; run under torchrun for more than one process).")
DEFAULT_MODEL = "minicpm4-0.5b"  # model_spec.toml's [model]; `tiny` runs the same math on a CPU


_guard = guard  # core/cli_guard.py: EngineError -> one line and exit 1, Unsupported -> exit 77


def _model(spec: str):
    from train_engine_0_5b.model_config import load

    return load(spec)


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
    from train_engine_0_5b.model_config import PRESETS

    cfg = cli_commands.pretrain_config(ctx, config, model, ops, options, PRESETS, DEFAULT_MODEL)
    cli_commands.write_summary(pretrain_mod.run(cfg), summary_json)


@app.command()
@_guard
def bench(
    seq_length: int = typer.Option(4096, "--seq-length", help="tokens per row"),
    micro_batch_size: int = typer.Option(4, "--micro-batch-size", help="rows per micro batch and rank"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro batches per step"),
    steps: int = typer.Option(10, "--steps", help="timed steps"),
    warmup: int = typer.Option(3, "--warmup", help="untimed steps first"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="preset (minicpm4-0.5b, tiny), model .toml or HF config.json; "
                              "on a CPU, tiny takes seconds and minicpm4-0.5b minutes per step"),
    device: str = typer.Option("auto", "--device", help="auto (cuda when there is one) | cuda | cpu"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on cuda, float32 on a CPU) | bfloat16 | float32"),
    ops: str = typer.Option("", "--ops", help="op=implementation,... (default: the device's defaults; `info` lists them)"),
    deterministic: bool = typer.Option(False, "--deterministic/--no-deterministic", help="off by default: timing needs no bit-exact replay"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="default: on with CUDA, off on a CPU"),
    recompute: str = typer.Option("none", "--recompute", help="activation recomputation per layer: none | mlp | attention | layer"),
    zero1: bool = typer.Option(False, "--zero1/--no-zero1", help="shard optimizer state over data-parallel ranks (ZeRO-1)"),
    cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="time replays of the step captured as one CUDA graph; default: on where it can be (CUDA, one rank, adamw=triton_fused, --warmup >= 2)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the result JSON here (rank 0)"),
    op_table: bool = typer.Option(False, "--op-table", help="also: each op timed alone vs its reference, and a profiler breakdown of 2 steps (JSON key op_table; tables on stderr)"),
) -> None:
    """Time training steps on random tokens (median after warm-up): tokens/s, step time, MFU, peak memory."""
    from train_engine_0_5b import bench as bench_mod
    from train_engine_0_5b.core import config
    from train_engine_0_5b.core.config import RuntimeConfig

    rt = config.build_section(RuntimeConfig, device=device, dtype=dtype, recompute=recompute)
    cfg = _model(model)
    if seq_length > cfg.max_seq_length:
        raise EngineError(f"--seq-length {seq_length} exceeds the model's max_seq_length ({cfg.max_seq_length})")
    result, is_main = bench_mod.run(cfg, seq_length=seq_length, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                                    steps=steps, warmup=warmup, device=rt.resolved_device(), dtype=rt.resolved_dtype(),
                                    ops_selection=_ops(ops), deterministic=deterministic,
                                    compile=rt.resolved_device() == "cuda" if compile is None else compile,
                                    op_table=op_table, recompute=rt.recompute, zero1=zero1, cuda_graph=cuda_graph)
    if is_main:
        text = json.dumps(result, indent=2)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(text + "\n")
        typer.echo(text)
        if op_table:  # stderr: stdout stays one JSON document; 120 columns unless a terminal says otherwise
            from train_engine_0_5b.op_table import render

            out = err if err.is_terminal else Console(stderr=True, highlight=False, width=120)
            for table in render(result["op_table"]):
                out.print(table)


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


@app.command()
def info() -> None:
    """Presets, the op registry (with unavailable implementations and why), environment switches."""
    from train_engine_0_5b.core import env
    from train_engine_0_5b.model_config import PRESETS
    from train_engine_0_5b.ops.registry import DEVICE_DEFAULTS, OPS, UNAVAILABLE

    typer.echo(f"presets: {', '.join(PRESETS)} (default {DEFAULT_MODEL})")
    for op, impls in OPS.items():
        typer.echo(f"op {op}: {', '.join(impls)}")
    for (op, impl), why in sorted(UNAVAILABLE.items()):
        typer.echo(f"  unavailable {op}.{impl}: {why}")
    typer.echo(f"device defaults: {DEVICE_DEFAULTS}")
    typer.echo((env.__doc__ or "").strip())
