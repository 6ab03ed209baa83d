"""`bash agent-loop.sh bench ...`: the side-by-side benchmark driver (benchmarks/compare.py).

Every argument is handed to `python -m benchmarks.compare` unchanged, e.g.
`bench --model minicpm4-0.5b --seq-length 4096 --micro-batch-size 8 --steps 8 --out DIR`,
`bench --dry-run`, `bench --smoke --out DIR`; `bench --help` shows the driver's options.
"""

import typer


def main(ctx: typer.Context) -> None:
    """Benchmark engines against megatron-core, eager and torch.compile in one run (args: benchmarks.compare)."""
    from benchmarks.compare import main as compare

    raise typer.Exit(compare(list(ctx.args)))


CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
