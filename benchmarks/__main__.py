"""`python -m benchmarks [NAME [ARGS...]]`: the named experiments; without a name, what exists.

Each name runs one module's own typed command line (`python -m benchmarks compare --help`). On a lent GPU machine
`bash benchmarks/gpu/session.sh PART [options]` runs the session parts (`python -m benchmarks.gpu.session --help`:
each part's typed options); they are listed here, and so is every script under `gpu/`, with its first line.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmarks.gpu.session_parts import PARTS

# name -> (module with main(argv), one line); the one list of what can be run
COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("benchmarks.compare", "every stack side by side on one GPU (--smoke: the CPU, tiny preset)"),
    "agreement": ("benchmarks.agreement", "torch reference vs megatron stacks on one case, through the probe contract"),
    "data": ("benchmarks.data.__main__", "the data pipeline on the CPU: tokenize | scale"),
    "results": ("benchmarks.results_index", "the results index: check | readme | add"),
    "results-archive": ("benchmarks.archive", "move superseded results that nothing cites under results/archive/"),
}
GPU_DIR = Path(__file__).resolve().parent / "gpu"

app = typer.Typer(add_completion=False, invoke_without_command=True, help=__doc__.splitlines()[0])


def first_sentence(path: Path) -> str:
    """A script's first sentence of description: its docstring, else its comment block after the shebang."""
    text = path.read_text(errors="replace")
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
    else:
        lines = [line for line in text.splitlines()[1:] if not line.startswith("set ")]
        block = [line.lstrip("#").strip() for line in lines[: next((i for i, x in enumerate(lines)
                                                                      if not x.startswith("#")), len(lines))]]
        doc = "\n".join(block)
    para = " ".join(doc.split("\n\n")[0].split())
    return para.split(". ")[0].rstrip(".") if para else "(no description)"


def listing(console: Console) -> None:
    t = Table(title="python -m benchmarks NAME [ARGS...]")
    t.add_column("name")
    t.add_column("what it runs", overflow="fold")
    for name, (_, what) in COMMANDS.items():
        t.add_row(name, what)
    console.print(t)
    p = Table(title=escape("GPU session parts: bash benchmarks/gpu/session.sh PART [options] [-- PART ...] "
                           "(PART --help)"))
    p.add_column("part")
    p.add_column("what it runs", overflow="fold")
    for name, part in PARTS.items():
        p.add_row(name, part.help)
    console.print(p)
    g = Table(title="GPU scripts (benchmarks/gpu/; the parts above run them)")
    g.add_column("script")
    g.add_column("what it runs", overflow="fold")
    for path in sorted(p for p in GPU_DIR.iterdir() if p.suffix in (".py", ".sh")):
        g.add_row(path.name, first_sentence(path))
    console.print(g)


@app.callback()
def main(ctx: typer.Context) -> None:
    """List the named experiments when no name is given."""
    if ctx.invoked_subcommand is None:
        listing(Console())


def _command(name: str, module: str, what: str) -> None:
    @app.command(name, help=what, add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def run(ctx: typer.Context) -> None:
        rc = importlib.import_module(module).main(list(ctx.args))  # the module parses its own typed options
        raise typer.Exit(rc or 0)


for _name, (_module, _what) in COMMANDS.items():
    _command(_name, _module, _what)


if __name__ == "__main__":
    sys.exit(app(prog_name="python -m benchmarks"))
