"""CLI of the `torch` reference stack: `python -m gates.stacks.torch_ref probe PROBE --case DIR --out DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from gates.case import CaseError, load_case
from gates.probe import EXIT_UNSUPPORTED, PROBES, write_outputs

app = typer.Typer(add_completion=False, help="The eager-PyTorch reference stack (probe contract).")


@app.callback()
def main(attention: str = typer.Option("eager", "--attention", help="eager (the spec) | sdpa (torch's fused "
                                       "attention kernel, for long sequences)")) -> None:
    from gates.stacks.torch_ref.model import ATTENTION
    from gates.stacks.torch_ref.probes import OPTIONS

    if attention not in ATTENTION:
        typer.echo(f"error: --attention must be one of {', '.join(ATTENTION)}, got {attention!r}", err=True)
        raise typer.Exit(2)
    OPTIONS["attention"] = attention


@app.command()
def probe(
    name: str = typer.Argument(..., help=f"one of {', '.join(PROBES)}"),
    case: Path = typer.Option(..., "--case", help="case directory"),
    out: Path = typer.Option(..., "--out", help="output directory"),
) -> None:
    """Answer one probe of the contract (gates/probe.py) on a case."""
    from gates.stacks.torch_ref.probes import run_probe

    if name not in PROBES:
        typer.echo(f"unsupported probe {name!r}; this stack answers {', '.join(PROBES)}", err=True)
        raise typer.Exit(EXIT_UNSUPPORTED)
    try:
        c = load_case(case)
    except CaseError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    tensors, metrics = run_probe(name, c, out)
    write_outputs(out, tensors, metrics)
    typer.echo(f"torch reference: {name} -> {out}")


@app.command()
def info() -> None:
    """Print what this stack is."""
    typer.echo("torch: eager PyTorch MiniCPM4 reference (gates/stacks/torch_ref)")


if __name__ == "__main__":
    sys.exit(app())
