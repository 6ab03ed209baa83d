"""Step metrics and their three outputs: the console line, the JSONL log, the progress bar.

MFU is DESIGN.md's formula: Megatron-LM's training FLOPs per token (causal attention halved, the
true vocabulary) x tokens / (step time x GPUs x peak); the peak is FORGE_ENGINE_PEAK_TFLOPS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from train_engine_0_5b import env
from train_engine_0_5b.model_config import MiniCPMConfig


def mfu(cfg: MiniCPMConfig, seq_length: int, tokens: int, seconds: float, gpus: int) -> float:
    """Model FLOPs utilization in [0, 1] (tokens over all GPUs in `seconds`)."""
    return cfg.flops_per_token(seq_length) * tokens / (seconds * gpus * env.peak_tflops() * 1e12)


def console_line(step: int, loss: float, step_time_s: float, tokens_per_s: float, mfu_value: float) -> str:
    return (f"[STEP {step}] loss={loss:.4f} | step_time={step_time_s * 1e3:.1f}ms | "
            f"tokens/s={tokens_per_s:,.0f} | mfu={mfu_value * 100:.2f}%")


def _records_until(log_file: Path, step: int) -> list[str]:
    """Lines of an existing JSONL log up to `step` (a crashed run may have logged past its checkpoint)."""
    if not log_file.is_file():
        return []
    kept = []
    for line in log_file.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by the crash
    return kept


class StepLog:
    """Rank 0's step output; other ranks construct it with enabled=False and it does nothing."""

    def __init__(self, log_file: Path | None, enabled: bool, total_steps: int, first_step: int):
        self.enabled = enabled
        self.console = Console(highlight=False, markup=False, soft_wrap=True)  # "[STEP n]" is text, not markup
        self._file = None
        self._progress = None
        if not enabled:
            return
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            kept = _records_until(log_file, first_step) if first_step > 0 else []
            self._file = log_file.open("w", encoding="utf-8")
            self._file.writelines(kept)  # a resume continues the log; steps past the checkpoint are dropped
        if env.progress_bar(sys.stdout.isatty()):
            self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                      console=self.console, transient=True)
            self._task = self._progress.add_task("train", total=total_steps, completed=first_step)
            self._progress.start()

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        self.console.print(console_line(record["step"], record["loss"], record["step_time_s"], record["tokens_per_s"], record["mfu"]))
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._progress is not None:
            self._progress.advance(self._task)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
