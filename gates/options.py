"""`GateOptions`: everything a gate run is parameterized by (re-exported by gates.runner)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GateOptions(BaseModel):
    """How to run a gate. `case` is a preset name (the gate then writes a fresh random case shaped
    for its check, from `seed`; `tiny` cases also draw their shape from it: gates/case.py draw_shape)
    or a case directory (used as is; its seed is recorded)."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field("torch", description="a gates.stacks.STACKS name: torch | megatron")
    case: str = Field("tiny", description="model preset name (gates.model_config.PRESETS) or a case directory")
    world_size: int | None = Field(None, ge=2, description="M4's data-parallel size; None: drawn from the seed "
                                   "for the tiny preset (gates/case.py draw_shape), else 2")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float64"] | None = Field(
        None, description="compute dtype of generated cases; default float32 on cpu, bfloat16 on cuda")
    policy: str = Field("dtype", description="bitwise | dtype | rel=X,max=Y (see gates/policies.py)")
    rel_bound: float | None = Field(None, gt=0, description="overrides the policy's rel bound")
    max_bound: float | None = Field(None, gt=0, description="overrides the policy's max_rel bound")
    seed: int | None = Field(None, description="None: a fresh random seed per run (recorded in the report)")
    steps: int = Field(4, ge=2, description="optimizer steps of M3 / M4 / M6 cases")
    micro_batch_size: int = Field(2, ge=1, description="rows per micro batch of generated cases (presets other "
                                  "than tiny, whose shape is drawn from the seed)")
    seq_length: int = Field(16, ge=2, description="sequence length of generated cases (presets other than tiny)")
    long_train_steps: int = Field(40, ge=2, description="M5: K steps of training on the default corpus")
    long_train_window: int = Field(10, ge=1, description="M5: trailing window (steps) of the loss statistic")
    long_train_threshold: float = Field(0.01, gt=0, description="M5: bound on the window's mean relative loss difference")
    long_train_lr: float = Field(1e-2, gt=0, description="M5: peak lr of a preset's long-train case (min lr a tenth of "
                                 "it); lower it for a preset whose training at 1e-2 is chaotic (the spec says why)")
    mfu_threshold: float = Field(0.36, ge=0, description="M5: MFU the engine's pretrain must reach, timed by the gate (GPU only)")
    m5_parts: Literal["both", "loss", "mfu"] = Field(
        "both", description="M5: the parts to run; one alone (a run split over machine calls of limited length) "
        "reports the other `unsupported`, so the gate never passes on half of its checks")
    speed_seq_length: int = Field(4096, ge=2, description="M5 speed: sequence length of the timed pretrain runs")
    speed_micro_batch_size: int = Field(8, ge=1, description="M5 speed: pretrain --micro-batch-size")
    speed_global_batch_size: int = Field(64, ge=1, description="M5 speed: pretrain --global-batch-size (accumulation "
                                         "= global / micro: real pretraining accumulates)")
    speed_steps: int = Field(10, ge=2, description="M5 speed: the warm run's steps and the fewest timed steps N "
                             "(raised to reach speed_target_timed_s)")
    speed_settle_steps: int = Field(5, ge=1, description="M5 speed: S, the timed run's steps before its window "
                                    "(compile, CUDA-graph capture); the window runs from step S's log line to step "
                                    "S+N's")
    speed_target_timed_s: float | None = Field(None, ge=0, description="M5 speed: N is raised (up to speed_max_steps) "
                                               "so the timed window should last this long, sized from the warm run's "
                                               "logged step times (a claim used for sizing only: the figure is the "
                                               "gate's clock). None: 20 s on a GPU, 0 on a CPU (CPU timing is tests')")
    speed_min_timed_s: float | None = Field(None, ge=0, description="M5 speed: a timed window shorter than this is "
                                            "`error`. None: 5 s on a GPU, 0 on a CPU")
    speed_max_steps: int = Field(200, ge=2, description="M5 speed: the most N the sizing may choose")
    cpu_peak_tflops: float | None = Field(None, gt=0, description="tests only: a peak for the CPU so M5's speed part "
                                          "runs there (without it the part is `unsupported` on a CPU)")
    pretrain_args: list[str] = Field([], description="the spec's production flags, added to every `pretrain` the "
                                     "gates run (default none: the engine's defaults are what users get)")
    tp: int = Field(1, ge=1, description="tensor-parallel degree of the engine's pretrain runs and probes: each gets `--tp TP` "
                    "and TP x its data-parallel processes (an engine with tensor parallelism, e.g. train_engine_8b)")
    timeout_s: float = Field(1800.0, gt=0, description="wall-clock budget of one gate; exceeding it is verdict `error` (timeout)")
    out_dir: Path | None = Field(None, description="where reports (<gate>.json) are written; None: not written")
    reference_cache: Path | None = Field(
        None, description="test suites only: reuse reference outputs per (stack, probe, case hash). Off by "
        "default: files on disk are files an engine could look for")
    keep_workdirs: bool = Field(False, description="debugging: keep the sandboxes instead of deleting them")
    sandbox: Literal["required", "preferred", "off"] = Field(
        "required", description="engine isolation (gates/sandbox.py): required (no bubblewrap: verdict `error`), "
        "preferred (run unsandboxed when it is missing, and say so), off")

    @property
    def case_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.device == "cuda" else "float32")

    def speed_window_s(self) -> tuple[float, float]:
        """(target, floor) of M5's timed window in seconds, the device's defaults filled in."""
        gpu = self.device != "cpu"
        target = self.speed_target_timed_s if self.speed_target_timed_s is not None else (20.0 if gpu else 0.0)
        floor = self.speed_min_timed_s if self.speed_min_timed_s is not None else (5.0 if gpu else 0.0)
        return target, floor
