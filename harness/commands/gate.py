"""`bash agent-loop.sh gate NAME|all --engine PATH ...`: run stage-1 gates on an engine, write JSON reports.

Exit codes: 0 every gate run passed; 1 a gate failed; 2 usage error; 3 a gate ended in `error`
(timeout, crash, bad engine layout); 4 nothing failed but a gate was `unsupported` (e.g. M5's MFU on
CPU, M4 on cuda with too few GPUs): not a pass; 128 + N: signal N (SIGINT, SIGTERM, SIGHUP) ended it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer

from harness.commands._common import console

EXIT_CODES = {"passed": 0, "failed": 1, "error": 3, "unsupported": 4}


def main(
    name: str = typer.Argument(..., help="m1_forward .. m8_resume (or m1 .. m8), or `all`"),
    engine: Path = typer.Option(..., "--engine", help="engine directory (ENGINE/src/<pkg>/__main__.py)"),
    reference: str = typer.Option("torch", "--reference", help="reference stack: torch | megatron"),
    case: str = typer.Option("tiny", "--case", help="model preset (fresh random case) or a case directory"),
    world_size: int = typer.Option(2, "--world-size", help="M4's data-parallel size"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float64 (default: fp32 cpu, bf16 cuda)"),
    policy: str = typer.Option("dtype", "--policy", help="bitwise | dtype | rel=X,max=Y"),
    seed: Optional[int] = typer.Option(None, "--seed", help="default: fresh random (recorded)"),
    seq_length: int = typer.Option(16, "--seq-length", help="sequence length of generated cases"),
    micro_batch_size: int = typer.Option(2, "--rows", help="rows per micro batch of generated cases"),
    steps: int = typer.Option(4, "--steps", help="optimizer steps of M3 / M4 / M6 / M7 (M7: at least 4)"),
    long_train_steps: int = typer.Option(40, "--long-train-steps", help="M5's K"),
    long_train_lr: float = typer.Option(1e-2, "--long-train-lr", help="M5's peak lr (a preset's long-train case)"),
    mfu_threshold: float = typer.Option(0.36, "--mfu-threshold", help="M5's MFU bar (GPU)"),
    tp: int = typer.Option(1, "--tp", help="tensor-parallel degree: each engine rank runs as TP processes with --tp"),
    timeout_s: float = typer.Option(1800.0, "--timeout", help="seconds per gate; exceeding it is verdict error"),
    out: Optional[Path] = typer.Option(None, "--out", help="report directory (default: a new temporary one)"),
    sandbox: str = typer.Option("required", "--sandbox", help="engine isolation: required (bubblewrap; missing: "
                                "verdict error) | preferred (unsandboxed when missing, said in the report) | off"),
) -> None:
    """Run one gate (or `all`, in order, stopping at the first failure) and print a short summary."""
    from pydantic import ValidationError

    from gates.report import print_summary
    from gates.runner import GateOptions, resolve_name, run_all, run_gate, stage_verdict

    try:
        options = GateOptions(reference=reference, case=case, world_size=world_size, device=device, dtype=dtype,
                              policy=policy, seed=seed, seq_length=seq_length, micro_batch_size=micro_batch_size,
                              steps=steps, long_train_steps=long_train_steps, long_train_lr=long_train_lr,
                              mfu_threshold=mfu_threshold, tp=tp, timeout_s=timeout_s, out_dir=out, sandbox=sandbox)
        gate = None if name == "all" else resolve_name(name)
    except (ValidationError, KeyError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    if options.out_dir is None:
        options.out_dir = out = Path(tempfile.mkdtemp(prefix="forge-gate-reports-"))
    from harness.procs import Interrupted, exit_code, stop_signals

    try:  # a signal ends the running gate's engine commands and removes its work folders before exiting
        with stop_signals():
            reports = run_all(engine, options) if gate is None else [run_gate(gate, engine, options)]
    except Interrupted as e:
        console.print(f"[red]{e}[/]: the running gate's processes and work folders are gone; reports so far: {out}")
        raise typer.Exit(exit_code(e.signum))
    print_summary(reports)
    verdict = stage_verdict(reports) if gate is None else reports[0].verdict
    console.print(f"reports: {out}  (seed {reports[0].case.get('seed', options.seed)})  verdict: {verdict}", highlight=False)
    raise typer.Exit(EXIT_CODES[verdict])
