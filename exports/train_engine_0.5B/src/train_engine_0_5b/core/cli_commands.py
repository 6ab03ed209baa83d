"""Commands every engine's CLI registers as they are (`app.command("export-hf")(cli_commands.export_hf)`):
export-hf, dump-state, prepare-data; `bench` and `info` made for the engine (`bench_command`, `info_command`); and
`pretrain`'s shared part
(`pretrain_config`, `write_summary`). Each maps
its options to a core call; errors are one line (cli_guard.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer

from ..minicpm.config_files import Presets, load
from .cli_guard import err, guard
from .engine_config import EngineConfig
from .errors import EngineError

if TYPE_CHECKING:
    from .bench import Extra
    from .pretrain import EngineParts


def pretrain_model(spec: str | None, init_from: Path | None, presets: Presets, default_model: str):
    """--model, else --init-from's config.json, else the engine's model."""
    if spec is None and init_from is not None:
        if not (init_from / "config.json").is_file():
            raise EngineError(f"--init-from {init_from}: no config.json (expected a Hugging Face MiniCPM checkpoint directory)")
        return load(init_from / "config.json", presets)
    return load(spec or default_model, presets)


def pretrain_config(ctx: typer.Context, config: Path | None, model: str | None, ops: str, options: dict,
                    presets: Presets, default_model: str) -> EngineConfig:
    """The run's config from `pretrain`'s command line: a --config file's values with the options typed on the
    command line over them; the model from --model, else the file's, else --init-from's config.json, else
    `default_model`; the ops from --ops, else the file's."""
    from ..ops.registry import OpSelection
    from . import cli_options, run_config
    from .engine_config import build

    explicit = cli_options.given(ctx)
    file = run_config.read(config) if config is not None else {}
    sections = cli_options.sections(options, file, explicit)
    init_from = sections["checkpoint"].get("init_from")
    if model is None and "model" in file:
        model_cfg = run_config.model_from(file["model"], str(config), presets)
    else:
        model_cfg = pretrain_model(model, Path(init_from) if init_from is not None else None, presets, default_model)
    use_file = "ops" in file and "ops" not in explicit
    selection = run_config.ops_from(file["ops"], str(config)) if use_file else OpSelection.parse(ops)
    return build(model=model_cfg, ops=selection, **sections)


def write_summary(summary: dict, path: Path | None) -> None:
    """--summary-json: the run summary (rank 0)."""
    import json
    import os

    if path is not None and int(os.environ.get("RANK", 0)) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")


@guard
def export_hf(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="a checkpoint directory, or a save dir (its latest)"),
    out: Path = typer.Option(..., "--out", help="output directory (must be empty or absent unless --force)"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
    layout: str = typer.Option("llama", "--layout", help="llama: LlamaForCausalLM, MiniCPM scales folded, no remote code; "
                               "minicpm: the official MiniCPM layout, which --init-from reads back"),
) -> None:
    """Write a Hugging Face checkpoint (Llama layout, MiniCPM scales folded; or the native MiniCPM layout) plus
    the tokenizer files."""
    from ..minicpm.export_hf import export

    path = export(checkpoint, out, dtype, force=force, layout=layout)
    typer.echo(f"exported {path}")


@guard
def dump_state(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="a checkpoint directory, or a save dir (its latest)"),
    out: Path = typer.Option(..., "--out", help="output directory: tensors.safetensors + metrics.json"),
) -> None:
    """Write a checkpoint's fp32 master weights (weight.NAME) and AdamW moments (exp_avg.NAME, exp_avg_sq.NAME)."""
    from .checkpoint import dump_state as dump

    typer.echo(f"wrote {dump(checkpoint, out)}")


@guard
def prepare_data(
    inputs: list[str] = typer.Option([], "--input", help="a local file or directory (Parquet, Arrow, JSON/JSONL, text, "
                                     "a save_to_disk directory) or a Hub dataset name (streamed); repeat for several"),
    out: Optional[Path] = typer.Option(None, "--out", help="the prepared dataset's directory (rerun the same command to "
                                       "resume an interrupted run)"),
    tokenizer_path: Optional[str] = typer.Option(None, "--tokenizer-path", help="HF tokenizer directory; default: the shipped tokenizer"),
    hf_dataset_config: Optional[str] = typer.Option(None, "--hf-dataset-config", help="Hub dataset configuration"),
    hf_dataset_split: str = typer.Option("train", "--hf-dataset-split", help="split of a Hub / save_to_disk dataset"),
    hf_text_template: Optional[str] = typer.Option(None, "--hf-text-template", help='e.g. "Question: {question}\\nAnswer: {answer}"; default: the text column'),
    workers: Optional[int] = typer.Option(None, "--workers", help="tokenizer processes (default: one per core)"),
    shard_mb: float = typer.Option(32.0, "--shard-mb", help="MB (million characters) of text per shard: the unit of "
                                   "parallelism and resume (a shard holds ~1/4 as many tokens)"),
    docs_per_shard: int = typer.Option(1_000_000, "--docs-per-shard", help="at most this many documents per shard"),
    verify: Optional[Path] = typer.Option(None, "--verify", help="instead: rehash every shard of this prepared dataset "
                                          "against its manifest"),
) -> None:
    """Tokenize a corpus once into memory-mapped token shards with a manifest (train on them with --prepared-data)."""
    from ..data import prepare_data as prepare_mod, shards

    if verify is not None:
        m = shards.verify(verify)
        typer.echo(f"{verify}: {len(m.shards)} shards, {m.n_tokens:,} tokens, {m.n_docs:,} documents: every file matches its manifest")
        return
    if out is None:
        raise EngineError("prepare-data needs --out (or --verify DIR)")
    res = prepare_mod.run(inputs, out, tokenizer_path, hf_dataset_config, hf_dataset_split, hf_text_template, workers,
                          docs_per_shard, shard_mb, console=err)
    m = res.manifest
    rate = f", {m.n_tokens / res.seconds:,.0f} tokens/s" if res.seconds > 0 else ""
    typer.echo(f"prepared {out}: {m.n_tokens:,} tokens ({m.dtype}), {m.n_docs:,} documents, {len(m.shards)} shards "
               f"({res.reused} kept from an interrupted run) in {res.seconds:.1f} s{rate}")


def bench_command(engine: Callable[[], "EngineParts"], presets: Presets, default_model: str,
                  op_table: Callable[[], "Extra"] | None = None):
    """The engine's `bench` command (core/bench.py) over its EngineParts (`engine()`, imported when it runs);
    `op_table`: the engine's per-op table for --op-table (None: refused)."""

    @guard
    def bench(
        seq_length: int = typer.Option(4096, "--seq-length", help="tokens per row"),
        micro_batch_size: int = typer.Option(4, "--micro-batch-size", help="rows per micro batch and data-parallel rank"),
        grad_accum: int = typer.Option(1, "--grad-accum", help="micro batches per step"),
        steps: int = typer.Option(10, "--steps", help="timed steps"),
        warmup: int = typer.Option(3, "--warmup", help="untimed steps first"),
        model: str = typer.Option(default_model, "--model", help=f"preset ({', '.join(presets)}), model .toml or HF "
                                  "config.json; on a CPU the small presets take seconds per step, full-size ones minutes"),
        device: str = typer.Option("auto", "--device", help="auto (cuda when there is one) | cuda | cpu"),
        dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on cuda, float32 on a CPU) | bfloat16 | float32"),
        ops: str = typer.Option("", "--ops", help="op=implementation,... (default: the device's defaults)"),
        deterministic: bool = typer.Option(False, "--deterministic/--no-deterministic", help="off by default: timing needs no bit-exact replay"),
        compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="default: on with CUDA, off on a CPU"),
        recompute: str = typer.Option("none", "--recompute", help="activation recomputation per layer: none | mlp | attention | layer"),
        zero1: bool = typer.Option(False, "--zero1/--no-zero1", help="shard optimizer state over data-parallel ranks (ZeRO-1)"),
        cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph", help="time replays of the step captured as one CUDA graph; default: on where it can be (CUDA, one rank, adamw=triton_fused, --warmup >= 2)"),
        tp: int = typer.Option(1, "--tp", help="tensor-parallel degree (an engine without tensor parallelism takes 1 only)"),
        json_path: Optional[Path] = typer.Option(None, "--json", help="write the result JSON here (rank 0)"),
        with_op_table: bool = typer.Option(False, "--op-table", help="also: each op timed alone vs its reference, and a profiler breakdown of 2 steps (JSON key op_table; tables on stderr)"),
    ) -> None:
        """Time training steps on random tokens (median after warm-up): tokens/s, step time, MFU, peak memory."""
        import json

        from ..ops.registry import OpSelection
        from . import bench as core_bench
        from .env import torchrun_world

        if with_op_table and op_table is None:
            raise EngineError("--op-table: this engine has no per-op table")
        if with_op_table and tp > 1:
            raise EngineError("--op-table times each op at one GPU's whole-model shapes: run it at --tp 1 (one TP "
                              "rank's shapes: a model .toml of them, as benchmarks/models/ has)")
        world = torchrun_world()[1]
        if world % tp:
            raise EngineError(f"--tp {tp} does not divide the world size ({world} ranks)")
        cfg = core_bench.config(load(model, presets), OpSelection.parse(ops), seq_length=seq_length,
                                micro_batch_size=micro_batch_size, grad_accum=grad_accum, steps=steps, warmup=warmup,
                                data_parallel=world // tp, zero1=zero1, device=device, dtype=dtype,
                                deterministic=deterministic, compile=compile, recompute=recompute, cuda_graph=cuda_graph,
                                tp=tp)
        result, is_main = core_bench.run(cfg, engine(), warmup=warmup, extra=op_table() if with_op_table else None)
        if is_main:
            text = json.dumps(result, indent=2)
            if json_path is not None:
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(text + "\n")
            typer.echo(text)

    return bench


def info_command(presets: Presets, default_model: str, runs: tuple[str, ...] | None = None,
                 auto_unfused: tuple[str, ...] = (), note: str = "") -> Callable[[], None]:
    """The engine's `info` command: its presets, the registry ops its model runs (`runs`, None: every op of the
    table) with their implementations, the unavailable ones and why, what `auto` runs per device (the preference
    order, then the op's fallback; the plain modules for the engine's `auto_unfused` ops), the engine's `note`, and
    the environment switches."""

    def info() -> None:
        """Presets, the op registry this engine runs (with unavailable implementations and why), environment switches."""
        from ..ops.registry import DEVICE_DEFAULTS, OPS, SPECS, UNAVAILABLE, UNFUSED
        from . import env

        shown = [op for op in OPS if runs is None or op in runs]
        typer.echo(f"presets: {', '.join(presets)} (default {default_model})")
        for op in shown:
            typer.echo(f"op {op}: {', '.join(OPS[op])}")
        for (op, impl), why in sorted(UNAVAILABLE.items()):
            if op in shown:
                typer.echo(f"  unavailable {op}.{impl}: {why}")

        def auto(device: str, op: str) -> tuple[str, ...]:
            order = (UNFUSED,) if op in auto_unfused else (*DEVICE_DEFAULTS[device].get(op, ()), SPECS[op].fallback)
            return tuple(dict.fromkeys(order))

        typer.echo(f"device defaults: { {dev: {op: auto(dev, op) for op in shown} for dev in DEVICE_DEFAULTS} }")
        if note:
            typer.echo(note)
        typer.echo((env.__doc__ or "").strip())

    return info
