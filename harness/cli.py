"""The CLI behind `bash agent-loop.sh`: one typer app, one sub-app or command per verb.

Verbs not built yet say so and exit 2 (`harness.commands._common.not_built`); none pretends to succeed.
"""

from __future__ import annotations

import importlib

from pathlib import Path
from typing import Optional

import typer

from harness.cli_help import PlainHelpGroup
from harness.commands._common import console

app = typer.Typer(add_completion=False, no_args_is_help=True, cls=PlainHelpGroup,
                  help="forge: forge, gate, inspect and train LLM pretraining engines.")
case_app = typer.Typer(no_args_is_help=True, cls=PlainHelpGroup, help="Make and inspect probe-contract cases.")
app.add_typer(case_app, name="case")


@case_app.command("new")
def case_new(
    out: Path = typer.Option(..., "--out", help="directory to write the case into"),
    model: str = typer.Option("tiny", "--model", help="preset name, model .toml, or HF config.json"),
    steps: int = typer.Option(4, "--steps", help="optimizer steps"),
    world_size: int = typer.Option(1, "--world-size", help="data-parallel ranks"),
    micro_batch_size: int = typer.Option(2, "--micro-batch-size", help="rows per micro batch"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro batches per step and rank"),
    seq_length: int = typer.Option(16, "--seq-length", help="tokens per row"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float64"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    seed: int = typer.Option(0, "--seed", help="seed of the weights and batches"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate (default: the case default)"),
) -> None:
    """Write a case directory (case.json, weights.safetensors, batches.safetensors)."""
    from gates.case import CaseError, make_spec, new_case
    from gates.model_config import ConfigError, load

    try:
        optimizer = {} if lr is None else {"lr": lr, "min_lr": lr / 10}  # validated with the spec
        spec = make_spec(load(model), optimizer=optimizer, steps=steps, world_size=world_size, micro_batch_size=micro_batch_size,
                         grad_accum=grad_accum, seq_length=seq_length, dtype=dtype, device=device, seed=seed)
    except (CaseError, ConfigError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    new_case(out, spec)
    console.print(f"case written to {out} ({spec.model.name}, {spec.dtype}, {spec.steps} steps, world size {spec.world_size})")


@case_app.command("probe")
def case_probe(
    probe: str = typer.Argument(..., help="forward | backward | steps | checkpoint"),
    case: Path = typer.Option(..., "--case", help="case directory (`case new`)"),
    out: Path = typer.Option(..., "--out", help="directory for tensors.safetensors and metrics.json"),
    stack: str = typer.Option("torch", "--stack", help="reference stack name"),
) -> None:
    """Run one reference stack's probe on a case (the same subprocess call a gate makes)."""
    from gates.stacks import STACKS
    from harness import launcher

    if stack not in STACKS:
        console.print(f"[red]error:[/] unknown stack {stack!r}; one of {', '.join(STACKS)}")
        raise typer.Exit(2)
    done = launcher.run([*STACKS[stack], "probe", probe, "--case", str(case), "--out", str(out)], capture=False)
    raise typer.Exit(done.returncode)


# Each verb lives in harness/commands/<verb>.py; this file only wires them up.
_HELP = {
    "forge": "Forge or improve an engine: stage prompts, agent rounds, gates, commits.",
    "gate": "Run one gate (or `all`) on an engine against a reference stack.",
    "inspect": "Show what an engine is and what it has proven.",
    "certify": "Run a spec's gate stages on a committed engine and record them in its manifest.json.",
    "train": "Train with an exported engine under torchrun.",
    "bench": "Benchmark engines against megatron-core, eager and torch.compile in one run.",
    "demo": "The main job on a fresh machine: forge the tiny engine offline, train it, inspect it.",
}
for _verb, _help in _HELP.items():
    _mod = importlib.import_module(f"harness.commands.{_verb}")
    app.command(_verb, short_help=_help, context_settings=getattr(_mod, "CONTEXT", None))(_mod.main)


def main() -> None:
    from harness.secrets import seal

    seal()  # first: keys into the vault, out of the environment every child inherits and out of /proc/<pid>/environ
    app(prog_name="bash agent-loop.sh")
