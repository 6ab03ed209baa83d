"""Each step's report, read one step late: the loop queues step N+1 before it reads step N, so on a GPU
the host never waits for an idle device. Also where a non-finite step stops the run (--nan-policy stop):
every step is read here before any checkpoint that includes it is written (the loop flushes first).

On a GPU, a step's scalars are copied into pinned host memory behind the step and an event is recorded
right after, before step N+1 is queued; reading waits for that event alone (`.item()` would wait for step
N+1 too). step_time_s is the time between consecutive step completions (the first: from the loop's
start or the end of a checkpoint save). On a GPU it is measured on the device, between those events: the
host may observe a completion late (it queues the next step first), and host time would then give every
step the previous one's lateness and the last step only the tail of its work (2.9 ms in an H200 run).
A CPU step runs inside train_step, so it completes when train_step returns.
"""

from __future__ import annotations

import math
import time

import torch

from . import runtime
from .config import RunConfig
from .dist import DistContext
from .errors import EngineError
from .metrics import StepLog, mfu
from .trainer import StepResult


def _event() -> torch.cuda.Event:
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


class Staged:
    """A step's (loss, grad norm, valid tokens), copied to the host behind the step's own work: on CUDA an
    asynchronous copy into pinned memory and a timing event recorded after it, so `read` waits for this
    step only; elsewhere the tensors themselves (reading them is synchronous there anyway)."""

    def __init__(self, res: StepResult):
        self.res, self.host, self.event = res, None, None
        if res.loss.is_cuda:
            values = torch.stack([res.loss.double(), res.grad_norm.double(), res.valid_tokens.double()])
            self.host = torch.empty(3, dtype=torch.float64, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = _event()

    def read(self) -> tuple[float, float, int]:
        if self.event is None:
            return float(self.res.loss), float(self.res.grad_norm), int(self.res.valid_tokens)
        self.event.synchronize()
        loss, norm, valid = self.host.tolist()
        return loss, norm, int(valid)


class StepReports:
    """`hold` right after queueing a step: stages its scalars, reports the step before it. `flush` reads
    and logs the held step (before a checkpoint, a stop, the end, an error)."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, log: StepLog):
        self.cfg, self.ctx, self.log = cfg, ctx, log
        self.tokens = cfg.train.global_batch_size * cfg.train.seq_length
        self.cuda = ctx.device.type == "cuda"
        self.pending: tuple[int, Staged, float] | None = None  # step, its result staged, when train_step returned
        self.times: list[float] = []
        self.losses: list[float] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        """Now is the last completion (the loop's start, the end of a save: the save's time is no step's)."""
        self.mark = time.perf_counter()
        self.mark_event = _event() if self.cuda else None

    def hold(self, step: int, res: StepResult) -> None:
        returned = time.perf_counter()
        staged = Staged(res)
        self.flush()
        self.pending = (step, staged, returned)

    def _elapsed(self, staged: Staged, returned: float) -> float:
        if staged.event is None:
            dt, self.mark = returned - self.mark, returned
            return dt
        dt, self.mark_event = self.mark_event.elapsed_time(staged.event) / 1e3, staged.event
        return dt

    def flush(self, extra: dict | None = None) -> None:
        """Log the held step (`extra`: more keys for its record, e.g. a validation's)."""
        if self.pending is None:
            return
        (step, staged, returned), self.pending = self.pending, None
        loss, norm, valid = staged.read()  # waits for this step (and what was queued before it) only
        dt, res, t = self._elapsed(staged, returned), staged.res, self.cfg.train
        record = {"step": step + 1, "loss": loss, "grad_norm": norm, "lr": res.lr, "tokens": self.tokens,
                  "valid_tokens": valid, "step_time_s": dt, "tokens_per_s": self.tokens / dt,
                  "mfu": mfu(self.cfg.model, t.seq_length, self.tokens, dt, self.ctx.world, self.ctx.device.type),
                  "tflops_per_gpu": self.cfg.model.flops_per_token(t.seq_length) * self.tokens / dt / self.ctx.world / 1e12,
                  "peak_mem_gib": runtime.peak_memory_gib(self.ctx.device)}
        if res.skipped:
            record["skipped"] = True
        record.update(extra or {})
        self.log.step(record)
        self.times.append(dt)
        self.losses.append(loss)
        if not res.skipped and not (math.isfinite(loss) and math.isfinite(norm)):
            raise EngineError(f"step {step + 1}: non-finite loss ({loss}) or grad norm ({norm}); the run stops before any "
                              "checkpoint of it (--nan-policy stop; --nan-policy skip skips such steps)")
