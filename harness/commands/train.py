"""`bash agent-loop.sh train`: not built yet (its issue is open)."""

import typer

from harness.commands._common import not_built


def main(ctx: typer.Context) -> None:
    """(not built yet)"""
    not_built("train")


CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
