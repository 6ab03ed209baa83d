"""Step metrics and their outputs: the console line, the progress bar, the sinks (sinks.py: JSONL,
TensorBoard, Weights & Biases).

MFU is DESIGN.md's formula: Megatron-LM's training FLOPs per token (causal attention halved, the
true vocabulary) x tokens / (step time x GPUs x peak); the peak is FORGE_ENGINE_PEAK_TFLOPS (env.py): none on
the CPU unless given, and then MFU is None (a GPU's peak would make a CPU figure meaningless).
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import env
from .config import ModelConfig


def mfu(cfg: ModelConfig, seq_length: int, tokens: int, seconds: float, gpus: int, device: str) -> float | None:
    """Model FLOPs utilization in [0, 1] (tokens over all `gpus` devices in `seconds`); None without a peak."""
    peak = env.peak_tflops(device)
    return None if peak is None else cfg.flops_per_token(seq_length) * tokens / (seconds * gpus * peak * 1e12)


def console_line(step: int, loss: float, step_time_s: float, tokens_per_s: float, mfu_value: float | None) -> str:
    shown = "n/a (no CPU peak)" if mfu_value is None else f"{mfu_value * 100:.2f}%"
    return (f"[STEP {step}] loss={loss:.4f} | step_time={step_time_s * 1e3:.1f}ms | "
            f"tokens/s={tokens_per_s:,.0f} | mfu={shown}")


class StepLog:
    """Rank 0's step output; other ranks construct it with enabled=False and it does nothing."""

    def __init__(self, sinks: list, enabled: bool, total_steps: int, first_step: int):
        self.enabled = enabled
        self.console = Console(highlight=False, markup=False, soft_wrap=True)  # "[STEP n]" is text, not markup
        self.sinks = sinks if enabled else []
        self._progress = None
        if not enabled:
            return
        if env.progress_bar(sys.stdout.isatty()):
            self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                      console=self.console, transient=True)
            self._task = self._progress.add_task("train", total=total_steps, completed=first_step)
            self._progress.start()

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        line = console_line(record["step"], record["loss"], record["step_time_s"], record["tokens_per_s"], record["mfu"])
        self.console.print(line + (" | skipped (non-finite)" if record.get("skipped") else ""))
        for sink in self.sinks:
            sink.write(record)
        if self._progress is not None:
            self._progress.advance(self._task)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        for sink in self.sinks:
            sink.close()
