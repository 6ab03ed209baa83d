"""Helpers shared by the CLI verbs."""

import typer
from rich.console import Console

from harness.secrets import RedactedStream

console = Console(file=RedactedStream())  # messages may quote a service's error, which may echo a key
EXIT_NOT_BUILT = 2


def not_built(verb: str) -> None:
    """A verb that is not built says so and exits 2: it never pretends to succeed."""
    console.print(f"[yellow]`{verb}` is not built yet in this workspace (see the open issues); nothing was run.[/]")
    raise typer.Exit(EXIT_NOT_BUILT)
