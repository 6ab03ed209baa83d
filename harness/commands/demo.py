"""`bash agent-loop.sh demo`: forge the tiny engine offline from a broken start, train it, inspect it.

See harness/demo.py for the steps. Exit 0 when every step did what it should (a round failed, its
report fed the next, the fix passed and landed, the loss fell), 1 otherwise.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

from harness.commands._common import console


def main(
    out: Optional[Path] = typer.Option(None, "--out", help="scratch directory (default runs/demo-<time>/)"),
    steps: int = typer.Option(40, "--steps", min=10, help="training steps after the forge"),
    stage: list[str] = typer.Option([], "--stage", help="forge only these stages (default: all of stage 1; m1 is the "
                                    "one that fails first)"),
) -> None:
    """The main job on a fresh machine: offline, CPU, a few minutes."""
    from harness.demo import SOURCE_ENGINE, run, summary
    from harness.gating import runner_available
    from harness.prompts import WORKSPACE_ROOT

    if not runner_available() or not (SOURCE_ENGINE / "src").is_dir():
        console.print("[red]error:[/] the demo needs gates/runner.py and exports/train_engine_0.5B")
        raise typer.Exit(2)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars in M6/M7's export check
    scratch = out or WORKSPACE_ROOT / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if scratch.exists() and any(scratch.iterdir()):
        console.print(f"[red]error:[/] {scratch} is not empty")
        raise typer.Exit(2)
    res = run(scratch, steps=steps, only=stage or None, console=console)
    summary(res, console)
    raise typer.Exit(0 if res.ok else 1)
