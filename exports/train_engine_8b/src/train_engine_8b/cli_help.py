"""`--help` without typer's `<int>`/`<bool>` type tags (typer >= 0.16 shows one on every option): flags show
nothing, values N / X / PATH / TEXT. `typer.Typer(cls=PlainHelpGroup)` applies it to the group and every command.

One file for the harness and the engines: exports vendor it byte for byte (tests/engines/test_engine_vendored.py)."""

from __future__ import annotations

from typer.core import TyperGroup


def _type_name(param: object) -> str:
    if hasattr(param, "bare_type"):  # typer >= 0.20 (its own click): the annotation's name
        return param.bare_type().lower()
    return str(getattr(getattr(param, "type", None), "name", "text")).lower()  # click's type names


def plain_metavar(param: object) -> str:
    """What `--help` shows after an option: nothing for a flag, N / X / PATH / TEXT for a value."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    name = _type_name(param)
    return {"int": "N", "integer": "N", "float": "X", "path": "PATH"}.get(name.split()[0] if name else "", "TEXT")


def plain_help(params: list) -> None:
    """Set the metavar of every option that has none (typer then shows it instead of its type tag)."""
    for p in params:
        kind = getattr(p, "param_type_name", "")
        if kind == "option" and p.metavar is None:
            p.metavar = plain_metavar(p)
        elif kind == "argument":  # its name is shown already; typer's argument rows read no metavar
            p.display_type_rich = lambda ctx: None


def _blank_help_option(cmd: object, ctx: object) -> None:
    opt = cmd.get_help_option(ctx)  # cached by the command: the one its help renders
    if opt is not None:
        opt.metavar = ""


class PlainHelpGroup(TyperGroup):
    """typer's help without its type tags, for the group and every command in it."""

    def get_command(self, ctx, cmd_name):  # noqa: ANN001, ANN201 - typer's / click's own types
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            plain_help(cmd.params)
            _blank_help_option(cmd, ctx)
        return cmd

    def get_help_option(self, ctx):  # noqa: ANN001, ANN201
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt
