"""The batches of the next steps, built on a background thread while the device runs the current one.

`Prefetcher(loader.batch, start, stop, device)` hands out `batch(step)` for step = start .. stop-1, in
that order and nothing past stop-1. For a CUDA device each tensor is copied into pinned (page-locked)
memory on the thread, so the loop's `.to(device, non_blocking=True)` is a true asynchronous copy
instead of a synchronous one from pageable memory; on a CPU the tensors are handed out as built.

`batch` runs only on the thread (PackedRows caches epochs: one caller at a time). An exception there
is raised by the consumer's next `get`, with the thread's traceback. The thread is a daemon and
`close()` (or leaving the `with` block) stops it, so an early stop or an error never hangs the exit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

import torch
from torch import Tensor

Batch = tuple[Tensor, ...]


class _Failure:
    """What the thread puts in the queue instead of a batch when `batch` raises."""

    def __init__(self, step: int, exc: BaseException):
        self.step, self.exc = step, exc


def _cuda_index(device: torch.device) -> int | None:
    """The CUDA device to pin for (None: do not pin). The thread must set it: pinning allocates through
    the current device's context, and a new thread's is device 0 (every rank would open a context there)."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class Prefetcher:
    """`batch(step)` for step = start .. stop-1 from a thread that stays at most `depth` batches ahead."""

    def __init__(self, batch: Callable[[int], Batch], start: int, stop: int, device: torch.device, depth: int = 2):
        self._batch, self._next, self._stop = batch, start, stop
        self._pin_device = _cuda_index(device)
        self._queue: queue.Queue[tuple[int, Batch] | _Failure] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(start,), name="batch-prefetch", daemon=True)
        self._thread.start()

    def _work(self, start: int) -> None:
        step = start
        try:
            if self._pin_device is not None:
                torch.cuda.set_device(self._pin_device)
            for step in range(start, self._stop):
                if self._closed.is_set():
                    return
                batch = self._batch(step)
                if self._pin_device is not None:
                    batch = tuple(x.pin_memory() for x in batch)
                self._queue.put((step, batch))  # blocks while `depth` batches wait; close() drains to wake it
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, which raises it)
            self._queue.put(_Failure(step, exc))

    def get(self, step: int) -> Batch:
        """The batch of `step`, which must be the next one; raises the thread's exception if building it failed."""
        if self._closed.is_set():
            raise RuntimeError("the prefetcher is closed")
        if step != self._next or step >= self._stop:
            raise ValueError(f"asked for the batch of step {step}; the next one is {self._next} (last: {self._stop - 1})")
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            item.exc.add_note(f"(raised on the batch prefetch thread while building the batch of step {item.step})")
            raise item.exc  # the same exception object: its traceback still holds the thread's frames
        self._next += 1
        return item[1]

    def close(self) -> None:
        """Stop the thread and wait for it (at most the batch it is building). Idempotent."""
        self._closed.set()
        while self._thread.is_alive():
            try:  # one producer: emptying the queue unblocks its put, then it sees `_closed`
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        while not self._queue.empty():  # drop what it put last: frees pinned memory now
            self._queue.get_nowait()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
