"""Every `--help` a user sees (bash agent-loop.sh and its verbs, the engine's CLI, the benchmark driver) renders
whole: no typer type tags (`<int>`, `<bool>`), no text cut with an ellipsis, every command's description and
every option's help present in full, every option described. Rendered in-process (typer's CliRunner)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from harness.cli import app as harness_app

ENGINE_SRC = Path(__file__).resolve().parents[2] / "exports" / "train_engine_0.5B" / "src"
TYPE_TAG = re.compile(r"<(?:bool|str|int|float|path|text|integer|boolean)(?: range)?>", re.IGNORECASE)
BOX = re.compile(r"[│╭╮╰╯─]+")


def engine_app() -> typer.Typer:
    sys.path.insert(0, str(ENGINE_SRC))
    try:
        from train_engine_0_5b.cli import app
    finally:
        sys.path.remove(str(ENGINE_SRC))
    return app


def flat(text: str) -> str:
    return " ".join(BOX.sub(" ", text).split())


def commands(app: typer.Typer) -> list[tuple[list[str], object]]:
    """(argv prefix, click command) for the app and every command under it."""
    root = typer.main.get_command(app)
    out, todo = [], [([], root)]
    while todo:
        path, cmd = todo.pop()
        out.append((path, cmd))
        todo += [([*path, name], sub) for name, sub in sorted(getattr(cmd, "commands", {}).items())]
    return out


def check(app: typer.Typer, path: list[str], cmd: object) -> None:
    r = CliRunner().invoke(app, [*path, "--help"], terminal_width=80)
    where = " ".join(path) or "(top)"
    assert r.exit_code == 0, f"{where}: {r.output}"
    assert not TYPE_TAG.search(r.output), f"{where}: type tag {TYPE_TAG.search(r.output).group()}"
    assert "…" not in r.output, f"{where}: cut with an ellipsis:\n{r.output}"
    text = flat(r.output)
    if cmd.help:
        first = flat(cmd.help.split("\n\n")[0])
        assert first in text and first[-1] in ".:)", f"{where}: description cut: {first!r}"
    for p in cmd.params:
        if getattr(p, "param_type_name", "") == "option":
            assert p.help, f"{where} {p.opts[0]}: no help text"
            assert flat(p.help) in text, f"{where} {p.opts[0]}: help cut: {p.help!r}"


@pytest.mark.parametrize("path", [p for p, _ in commands(harness_app) if p != ["bench"]], ids=" ".join)
def test_harness_help_is_whole(path: list[str]) -> None:
    check(harness_app, path, dict((tuple(p), c) for p, c in commands(harness_app))[tuple(path)])


def test_engine_help_is_whole() -> None:
    app = engine_app()
    for path, cmd in commands(app):
        check(app, path, cmd)


def test_bench_help_is_the_drivers_whole() -> None:
    """`bench --help` is benchmarks.compare's argparse help: its description is the docstring's whole first
    paragraph, and every option says what it does."""
    from benchmarks import compare

    p = compare.parser()
    assert p.description.endswith(".") and p.description.startswith("The side-by-side benchmark driver")
    assert flat(compare.__doc__.split("\n\n")[0]) == p.description
    undescribed = [a.option_strings[0] for a in p._actions if a.option_strings and not a.help]
    assert not undescribed
    r = CliRunner().invoke(harness_app, ["bench", "--help"])
    assert r.exit_code == 0 and flat(p.description) in flat(r.output)


def test_a_type_tag_and_an_undescribed_option_are_caught() -> None:
    bad = typer.Typer()

    @bad.command()
    def go(n: int = typer.Option(1, "--n")) -> None:
        """Go."""

    with pytest.raises(AssertionError):
        check(bad, [], typer.main.get_command(bad))
