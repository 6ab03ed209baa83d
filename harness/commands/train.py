"""`bash agent-loop.sh train --engine exports/<engine> [launch options] -- <pretrain options>`.

Launches the engine's `pretrain` under torchrun with the engine's `src/` on PYTHONPATH (so an engine
runs from its folder without being installed). One machine: `--nproc-per-node N` (torchrun
--standalone). Several: the same command on every node with `--nnodes N --rdzv-endpoint HOST:PORT`
(c10d rendezvous; torchrun assigns node ranks unless `--node-rank` is given). Everything after `--`
goes to `pretrain` unchanged; `--dry-run` prints the command instead of running it.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from harness.commands._common import console
from harness.prompts import WORKSPACE_ROOT
from harness.rank_errors import failing_rank_line, run_logged
from harness.secrets import train_env


def engine_package(engine: Path) -> str:
    """The engine's package: model_spec.toml's [engine] package, else the one package under src/."""
    spec = engine / "model_spec.toml"
    if spec.is_file():
        name = tomllib.loads(spec.read_text()).get("engine", {}).get("package")
        if name and (engine / "src" / name / "__main__.py").is_file():
            return name
    found = sorted(p.parent.name for p in (engine / "src").glob("*/__main__.py"))
    if len(found) != 1:
        raise typer.BadParameter(f"{engine} must hold exactly one package with a __main__.py under src/ (found {found})",
                                 param_hint="--engine")
    return found[0]


def torchrun_command(package: str, pretrain_args: list[str], *, nproc_per_node: int, nnodes: str, node_rank: int | None,
                     rdzv_endpoint: str | None, rdzv_id: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == "1" and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise typer.BadParameter("more than one node needs --rdzv-endpoint HOST:PORT", param_hint="--rdzv-endpoint")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
        if node_rank is not None:
            cmd.append(f"--node-rank={node_rank}")
    return cmd + ["-m", package, "pretrain", *pretrain_args]


def main(
    ctx: typer.Context,
    engine: Path = typer.Option(..., "--engine", help="engine folder, e.g. exports/train_engine_0.5B"),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="processes (GPUs) on this node"),
    nnodes: str = typer.Option("1", "--nnodes", help="nodes, N or MIN:MAX"),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="this node's rank (default: assigned by the rendezvous)"),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (multi-node)"),
    rdzv_id: str = typer.Option("forge-train", "--rdzv-id", help="job id shared by all nodes"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the torchrun command, run nothing"),
    console_log: Optional[Path] = typer.Option(None, "--console-log", help="where the ranks' whole output is kept "
                                               "(default: runs/train-<time>.log in the workspace)"),
) -> None:
    """Train with an exported engine under torchrun; options after `--` go to the engine's `pretrain`."""
    engine = engine.resolve()
    if not (engine / "src").is_dir():
        raise typer.BadParameter(f"{engine} is not an engine folder (no src/)", param_hint="--engine")
    cmd = torchrun_command(engine_package(engine), list(ctx.args), nproc_per_node=nproc_per_node, nnodes=nnodes,
                           node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
    src = str(engine / "src")
    env = train_env(PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    if dry_run:
        print(f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} {shlex.join(cmd)}")
        raise typer.Exit(0)
    log = console_log or WORKSPACE_ROOT / "runs" / f"train-{time.strftime('%Y%m%d-%H%M%S')}.log"
    console.print(f"[dim]launch: {shlex.join(cmd)}\nconsole log: {log}[/]", highlight=False, soft_wrap=True)
    rc, lines = run_logged(cmd, env, log)
    if rc != 0:
        line = failing_rank_line(lines)
        console.print(f"[bold red]train failed[/] (exit {rc}): " + escape(line or "no rank printed an error line"),
                      highlight=False, soft_wrap=True)
        console.print(f"full log: {log}", highlight=False, soft_wrap=True)
    raise typer.Exit(rc)


CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
