"""`bash agent-loop.sh forge --spec specs/X.toml [--agent BACKEND] [--resume] [--engine PATH]`.

Runs the forge loop (harness/loop.py) with the workspace's own gates. State lives in
`<repo>/.git/forge/<spec name>/` unless --state-dir says otherwise (inside .git: never in anyone's
`git status`, and the round worktrees stay out of the working tree). A passing round commits the engine and
its manifest.json on the run's branch and (the spec's `[loop] land`) fast-forwards the checked-out branch.

`--dry-run` forges a scratch copy instead (runs/forge-dry-run-<time>/: the engine as it is on disk, in its own
git repository, with the run's state beside it): prompts, agent rounds, gates and commits happen there, and
nothing lands on the user's branch or in the user's .git.

Exit codes: 0 every stage passed; 1 a budget stopped the run; 2 usage, spec or state error;
3 the agent's service kept failing (resume later); 4 the workspace's own code changed during a round;
5 the agent cannot work (a key refused, an unknown model, a missing CLI: fix it, then resume);
128 + N: signal N (SIGINT, SIGTERM, SIGHUP) ended the run (the round is recorded `interrupted`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from harness.commands._common import console

EXIT = {"passed": 0, "budget": 1, "agent_unavailable": 3, "tampered": 4, "agent_failed": 5}


def default_state_dir(engine: Path, spec_name: str) -> Path:
    import git

    repo = git.Repo(engine, search_parent_directories=True)
    common = Path(repo.git.rev_parse("--git-common-dir"))  # relative to the repository's root, not to our cwd
    return (Path(repo.working_tree_dir) / common).resolve() / "forge" / spec_name


def resolve_engine(path: str, base: Path) -> Path:
    p = Path(path)
    return p.resolve() if p.is_absolute() else (base / p).resolve()


def runs_dir() -> Path:
    from harness.prompts import WORKSPACE_ROOT

    return WORKSPACE_ROOT / "runs"  # git-ignored


def dry_run_copy(engine: Path, runs: Path) -> tuple[Path, Path]:
    """(the scratch copy of `engine`, the run's state dir), in a new runs/forge-dry-run-<time>-XXXX/."""
    import tempfile
    import time

    from harness.scratch import scratch_copy

    runs.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"forge-dry-run-{time.strftime('%Y%m%d-%H%M%S')}-", dir=runs))
    return scratch_copy(engine, scratch, f"dry run: {engine} as it is on disk"), scratch / "state"


def _parse_options(items: list[str]) -> dict:
    """`key=value` pairs, values read as JSON where they parse (`model=...` sets the agent's model)."""
    import json

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--agent-option {item!r} is not key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(
    spec_path: Path = typer.Option(..., "--spec", help="forge spec (specs/*.toml)"),
    agent: Optional[str] = typer.Option(None, "--agent", help="backend for every stage; a stage whose spec table "
                                        "names this backend keeps its options"),
    agent_option: list[str] = typer.Option([], "--agent-option", help="backend option key=value (JSON values), "
                                           "repeatable, merged into the spec's; model=NAME sets the model"),
    model: Optional[str] = typer.Option(None, "--model", help="the service's model name, for every stage"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in the state dir where it stopped"),
    engine: Optional[Path] = typer.Option(None, "--engine", help="the export to forge (default: the spec's engine.path)"),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="default: <repo>/.git/forge/<spec name>"),
    stage: list[str] = typer.Option([], "--stage", help="run only these stages (repeatable)"),
    land: Optional[bool] = typer.Option(None, "--land/--no-land", help="fast-forward the checked-out branch on each pass"),
    dry_run: bool = typer.Option(False, "--dry-run", help="forge a scratch copy (runs/forge-dry-run-<time>/): rounds, "
                                 "gates and commits happen there; nothing lands on your branch or in your .git"),
) -> None:
    """Forge or improve an engine: stage prompts, agent rounds in worktrees, gates, commits, ledger."""
    from harness.agents import BackendError
    from harness.gating import runner_available, stage_labels
    from harness.loop import ForgeError, ForgeLoop
    from harness.procs import exit_code
    from harness.prompts import WORKSPACE_ROOT
    from harness.spec import SpecError, load_spec, with_overrides
    from harness.workspace import WorkspaceError

    try:
        spec = load_spec(spec_path)
        options = _parse_options(agent_option)
        model = model or options.pop("model", None)
        spec = with_overrides(spec, engine_path=str(engine.resolve()) if engine else None, backend=agent,
                              options=options or None, model=model)
        unknown = [s for s in stage if s not in {st.name for st in spec.stages}]
        if unknown:
            raise SpecError(f"--stage {', '.join(unknown)}: not a stage of {spec.name}")
        eng = resolve_engine(spec.engine.path, WORKSPACE_ROOT)
        if not eng.is_dir():
            raise SpecError(f"engine.path: {eng} is not a directory")
        if not runner_available():
            console.print("[red]error:[/] gates/runner.py is not importable here: the loop needs the gates")
            raise typer.Exit(2)
        if dry_run:
            if resume or state_dir:
                raise SpecError("--dry-run starts a fresh run in a scratch copy: no --resume or --state-dir")
            eng, state = dry_run_copy(eng, runs_dir())
            spec = with_overrides(spec, engine_path=str(eng))
            console.print(f"dry run: forging a scratch copy, {eng} (state {state}); nothing lands in your repository")
        else:
            state = state_dir.resolve() if state_dir else default_state_dir(eng, spec.name)
        loop = ForgeLoop(spec, spec_path.resolve(), engine=eng, state_dir=state, console=console, land=land)
        outcome = loop.run(resume=resume, only=stage or None)
    except (SpecError, BackendError, ForgeError, WorkspaceError, RuntimeError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    color = "green" if outcome.ok else "red"
    console.print(f"[{color}]{outcome.status}[/]: {outcome.message}")
    labels = stage_labels(outcome.stages, Path(outcome.state_dir) / "ledger.jsonl")
    console.print(f"stages: {', '.join(f'{k}={v}' for k, v in labels.items())}", highlight=False)
    console.print(f"branch {outcome.branch} at {outcome.tip[:10] if outcome.tip else '-'}; state {outcome.state_dir}")
    if dry_run:
        console.print(f"dry run: nothing landed in your repository; the forged copy is {eng}, its rounds under {state}")
    elif outcome.status in ("budget", "agent_unavailable", "agent_failed", "interrupted"):
        console.print(f"continue with: bash agent-loop.sh forge --spec {spec_path} --resume"
                      + (f" --state-dir {state}" if state_dir else ""))
    if outcome.signum is not None:
        raise typer.Exit(exit_code(outcome.signum))
    raise typer.Exit(EXIT.get(outcome.status, 1))
