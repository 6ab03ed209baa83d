"""CLI of the megatron stacks: `python -m gates.stacks.megatron --attention unfused|sdpa probe PROBE --case DIR --out DIR`.

Exit 77 (unsupported) for `checkpoint`, for fp64 cases, on a machine without CUDA, and where
megatron-core is not importable; the message says which.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from gates.case import CaseError, load_case
from gates.probe import EXIT_UNSUPPORTED, PROBES, write_outputs

app = typer.Typer(add_completion=False, help="megatron-core GPTModel (local spec) as a probe-contract stack.")
_state: dict[str, str] = {}
SUPPORTED = ("forward", "backward", "steps")


@app.callback()
def main(attention: str = typer.Option("unfused", "--attention", help="unfused (local spec as shipped) | sdpa")) -> None:
    if attention not in ("unfused", "sdpa"):
        typer.echo(f"error: --attention must be unfused or sdpa, got {attention!r}", err=True)
        raise typer.Exit(2)
    _state["attention"] = attention


def _unsupported(msg: str) -> None:
    typer.echo(f"unsupported: {msg}", err=True)
    raise typer.Exit(EXIT_UNSUPPORTED)


@app.command()
def probe(
    name: str = typer.Argument(..., help=f"one of {', '.join(PROBES)}"),
    case: Path = typer.Option(..., "--case", help="case directory"),
    out: Path = typer.Option(..., "--out", help="output directory"),
) -> None:
    """Answer one probe of the contract (gates/probe.py) on a case."""
    from gates.stacks.megatron.model import unavailable_reason

    if name not in SUPPORTED:
        _unsupported(f"probe {name!r}: the megatron stack answers {', '.join(SUPPORTED)} (checkpointing is not wired in)")
    reason = unavailable_reason()
    if reason:
        _unsupported(reason)
    try:
        c = load_case(case)
    except CaseError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    from gates.stacks.megatron.probes import SUPPORTED_DTYPES, run_probe

    if c.spec.dtype not in SUPPORTED_DTYPES:
        _unsupported(f"dtype {c.spec.dtype}: the megatron stack runs {', '.join(SUPPORTED_DTYPES)}")
    import torch

    tensors, metrics = run_probe(name, c, _state["attention"])  # type: ignore[arg-type]
    if torch.distributed.get_rank() == 0:
        write_outputs(out, tensors, metrics)
        typer.echo(f"{metrics['stack']}: {name} -> {out}")
    torch.distributed.destroy_process_group()


@app.command()
def info() -> None:
    """Print what this stack is."""
    typer.echo(f"megatron ({_state['attention']} attention): megatron-core GPTModel, local layer spec, MiniCPM scales by hooks")


if __name__ == "__main__":
    sys.exit(app())
