"""`bash agent-loop.sh certify [--spec specs/X.toml] [--engine PATH] [--rev REV] [--stage NAME]`.

Runs the spec's gate stages on the engine as committed at REV (harness/certify.py) and records the accepted
ones in its manifest.json (and their reports in forge/reports/), as a forge round does when it lands; commit
those files to ship the proof. An `unsupported` part the spec accepts is recorded `unsupported`, never passed.

Exit codes: 0 every stage run was accepted and recorded; 1 a gate was not accepted (the stages before it are
recorded); 2 usage, spec or revision error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from harness.commands._common import console


def main(
    spec_path: Optional[Path] = typer.Option(None, "--spec", help="forge spec whose gate stages to run (default: "
                                             "specs/tiny-cpu.toml, the CPU tiny case, about 5 minutes on 2 cores)"),
    engine: Optional[Path] = typer.Option(None, "--engine", help="the engine folder (default: the spec's engine.path)"),
    rev: str = typer.Option("HEAD", "--rev", help="the commit whose engine code is judged"),
    stage: list[str] = typer.Option([], "--stage", help="run only these stages (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", help="gate reports directory (default runs/certify/<time>)"),
) -> None:
    """Run a spec's gate stages on a committed engine and record them in its manifest.json."""
    import time

    from harness.certify import CertifyError, certify
    from harness.commands.forge import resolve_engine
    from harness.gating import gate_line
    from harness.prompts import WORKSPACE_ROOT
    from harness.spec import SpecError, load_spec

    spec_path = spec_path or WORKSPACE_ROOT / "specs/tiny-cpu.toml"
    try:
        spec = load_spec(spec_path)
        eng = engine.resolve() if engine else resolve_engine(spec.engine.path, WORKSPACE_ROOT)
        out_dir = out or WORKSPACE_ROOT / "runs" / "certify" / time.strftime("%Y%m%d-%H%M%S")
        console.print(f"certify {eng.name} at {rev} against {spec.name}; gate reports under {out_dir}", highlight=False)
        cert = certify(spec, spec_path.resolve(), eng, rev=rev, only=stage or None, out_dir=out_dir,
                       on_gate=lambda st, gate, o: console.print(f"  {st}: {gate_line(gate, o)}"))
    except (SpecError, CertifyError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    for name in cert.skipped:
        console.print(f"[dim]stage {name}: an ops stage (an election, not a proof): skipped[/]")
    if cert.recorded:
        written = ", ".join(sorted(cert.files))
        console.print(f"recorded {', '.join(cert.recorded)} for commit {cert.rev[:10]} in {eng}: {written}",
                      highlight=False)
    failed = [s.stage for s in cert.stages if not s.accepted]
    if failed:
        console.print(f"[red]not certified[/]: stage {failed[0]}'s gates were not accepted; nothing of it recorded")
        raise typer.Exit(1)
    console.print(f"[green]certified[/]: {', '.join(cert.recorded)}; `bash agent-loop.sh inspect {eng}` shows them")
