"""The whole training step as one CUDA graph: forward, backward, gradient norm, clipped AdamW and the
bf16 parameter write-back, replayed with one launch per step (`--cuda-graph`).

Why: a replay has no Python, no launch overhead and no host-side gaps between the step's ~1,500 kernels
(the measurements: benchmarks/results, engine-0.5b-cudagraph-*).

Where it applies: CUDA, data parallelism (no tensor parallelism), and an AdamW op that takes the LR and step
count on the device. With one micro batch per step on one rank the backward's own gradient buffers feed the
optimizer (the trainer's direct path); otherwise the captured step holds every micro batch's forward and
backward and the reducer's fp32 accumulation into its persistent buffers (the graph's private pool reuses one
micro batch's activations for the next). With more than one rank it also holds the NCCL collectives: the
count's and the loss's all-reduces, the buckets' async all-reduces (or ZeRO-1's reduce-scatters) launched by
the backward hooks and waited on by the stream, and ZeRO-1's all-gather; NCCL replays a captured collective as
a collective, so every rank captures the same step. `check` refuses anything else with a message that names
the option to change. `supported` (what `pretrain` and `bench` graph by default) is every one-rank step
`check` allows, accumulation included (its GPU test, graphed against eager with the default ops:
benchmarks/results/gates/2026-12-03-h200-stage); more ranks are graphed when asked (`--cuda-graph`), as no
run on two GPUs has measured them yet (their GPU test holds a one-process NCCL group).

How (torch.cuda.graphs' whole-network capture):
1. the first `warmup` steps run eagerly, on the capture's side stream, with the LR and the step count
   as device tensors (the path the graph takes): torch.compile, Triton, FA4 and quack compile outside it;
2. the next step is captured (a capture runs nothing) and then replayed. The AdamW op's pointer tables
   for the graph's own gradient buffers live in a reserve allocated before the capture and are filled
   after it ends (triton_fused.deferred_tables: memory the capture allocates may be shared with an
   earlier temporary of the same replay, which is how the first version read garbage pointers on an H100);
3. every later step copies its batch into the graph's input buffers, writes the LR and step count into
   their device tensors, and replays.
A step's scalars are cloned out of the graph's outputs, which the next replay overwrites. The optimizer
state (masters, moments) and the parameters live outside the graph, so checkpoints read and load them as
in an eager run. A different batch shape after the capture is an error: the graph has fixed shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..ops.adamw import triton_fused
from .errors import EngineError
from .trainer import StepResult, Trainer

if TYPE_CHECKING:
    from .engine_config import EngineConfig


# int64 entries set aside (outside the graph's memory) for the AdamW tables the capture misses: the pointer
# tables of 5 lists x the parameters (0.5B: 218), and a work plan (4 per 16k elements) should it miss too
TABLE_RESERVE = 1 << 17


def check(trainer: Trainer, rows: int | None = None) -> None:
    """Raise EngineError unless `trainer` (with `rows` rows per step, when known) can run as one graph."""
    ctx = trainer.ctx
    if ctx.device.type != "cuda":
        raise EngineError(f"--cuda-graph needs a CUDA device (this run is on {ctx.device.type})")
    if trainer.tp is not None:
        raise EngineError("--cuda-graph with tensor parallelism: the model's TP collectives are not captured "
                          "(use --no-cuda-graph)")
    if not trainer.optimizer.fused:
        raise EngineError("--cuda-graph needs --ops adamw=triton_fused (the AdamW that takes the LR and step on the device)")
    if rows is not None and rows % trainer.micro_batch_size:
        raise EngineError(f"--cuda-graph: {rows} rows per step do not split into micro batches of "
                          f"{trainer.micro_batch_size}")


def supported(trainer: Trainer, rows: int) -> bool:
    """Whether a run is graphed by default: one rank, wherever `check` passes."""
    if trainer.ctx.world != 1:
        return False
    try:
        check(trainer, rows)
    except EngineError:
        return False
    return True


def step_function(trainer: Trainer, cfg: EngineConfig, rows: int, eager_steps: int = 2):
    """The step the loop calls, and whether it is a CUDA graph: (train_step or a GraphedStep, graphed).
    runtime.cuda_graph True: asked for (refused here, before any step, where it cannot run); None: wherever
    `supported` (and --nan-policy stop: a captured step cannot skip itself); False: never. `rows` per rank per
    step; `eager_steps` run before the capture."""
    want = cfg.runtime.cuda_graph
    if want:
        check(trainer, rows)
    graphed = want or (want is None and cfg.train.nan_policy == "stop" and supported(trainer, rows))
    if not graphed:
        return trainer.train_step, False
    return GraphedStep(trainer, warmup=eager_steps), True


class GraphedStep:
    """`Trainer.train_step` as a CUDA graph after `warmup` eager steps; call it as train_step."""

    def __init__(self, trainer: Trainer, warmup: int = 2):
        check(trainer)
        if warmup < 1:
            raise ValueError("GraphedStep needs at least one eager warm-up step (compilation, table caches)")
        self.trainer, self.warmup = trainer, warmup
        device = trainer.ctx.device
        self.lr = torch.zeros((), dtype=torch.float64, device=device)
        self.step_count = torch.zeros((), dtype=torch.float64, device=device)
        self.stream = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        self._inputs: tuple[Tensor, Tensor] | None = None  # the batch buffers every step reads
        self._out: StepResult | None = None
        self._tables: list[Tensor] = []  # the AdamW pointer tables the graph reads, views of:
        self._table_reserve = torch.empty(TABLE_RESERVE, dtype=torch.int64, device=device)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, input_ids: Tensor, labels: Tensor) -> StepResult:
        tr = self.trainer
        lr = tr.schedule.lr_at(tr.step + 1)
        self.lr.fill_(lr)  # a kernel with the value as its argument: no host sync
        self.step_count.fill_(tr.step + 1)
        if self._inputs is None:  # every step reads its batch from these: the compiled code sees one layout
            check(tr, input_ids.shape[0])  # the rows per step; later batches must keep this shape
            self._inputs = (torch.empty_like(input_ids, memory_format=torch.contiguous_format),
                            torch.empty_like(labels, memory_format=torch.contiguous_format))
        ids, lab = self._inputs
        if ids.shape != input_ids.shape or lab.shape != labels.shape:
            raise EngineError(f"--cuda-graph: the batch shape changed from {tuple(ids.shape)} to "
                              f"{tuple(input_ids.shape)}; a captured step has fixed shapes")
        ids.copy_(input_ids, non_blocking=True)
        lab.copy_(labels, non_blocking=True)
        if self.graph is None and self.eager_steps >= self.warmup:
            self._capture()
        if self.graph is None:
            return self._eager()
        self.graph.replay()
        tr.optimizer.step_count += 1  # the replayed optimizer step counts on the device only
        return _kept(self._out, lr)  # the captured result's lr is the capture step's Python float

    def _eager(self) -> StepResult:
        """One eager step on the capture stream (what torch.cuda.graphs asks of warm-up iterations)."""
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            res = self.trainer.train_step(*self._inputs, coefs=(self.lr, self.step_count))
        main.wait_stream(self.stream)
        self.eager_steps += 1
        return _kept(res, res.lr)

    def _capture(self) -> None:
        # the warm-up's train_step left every p.grad None: on the direct path the graph allocates its own
        # gradient buffers; with accumulation the reducer's fp32 buffers (outside the graph) take them
        tr = self.trainer
        graph = torch.cuda.CUDAGraph()
        count = tr.optimizer.step_count
        # thread_local: the data prefetcher's thread may pin host memory while this thread captures
        with triton_fused.deferred_tables(self._table_reserve) as self._tables:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._out = tr.train_step(*self._inputs, coefs=(self.lr, self.step_count))
        tr.optimizer.step_count = count  # the capture ran nothing; each replay counts its step
        self.graph = graph


def _kept(res: StepResult, lr: float) -> StepResult:
    """`res` with its tensors cloned on the caller's stream (a replay overwrites the graph's outputs, and a
    warm-up step's were allocated on the capture stream) and this step's `lr`."""
    return StepResult(res.loss.clone(), res.grad_norm.clone(), lr, res.valid_tokens.clone())
