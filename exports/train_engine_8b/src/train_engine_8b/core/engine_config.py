"""An engine's typed root configuration (`EngineConfig`): the model (the MiniCPM family's config) beside the
core's sections (config.py), each field documented and validated with a message that names it. `pretrain`'s
options are derived from the sections (cli_options.py); `pretrain --config run.toml` reads the same sections
(the engine's run_config.py); a checkpoint records the config it was trained with.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from ..minicpm.config import MiniCPMConfig
from ..ops.registry import OpSelection
from .config import CheckpointConfig, DataConfig, OptimConfig, RuntimeConfig, TrainConfig, build_section
from .errors import EngineError


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # not strict itself: its sections come as dicts

    model: MiniCPMConfig
    ops: OpSelection = OpSelection()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        t = self.train
        if t.seq_length > self.model.max_seq_length:
            raise ValueError(f"train.seq_length ({t.seq_length}) exceeds the model's max_seq_length "
                             f"({self.model.max_seq_length}, model {self.model.name})")
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size ({t.global_batch_size}) is not a multiple of "
                             f"train.micro_batch_size ({t.micro_batch_size})")
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr ({self.optim.min_lr}) exceeds optim.lr ({self.optim.lr})")
        if self.checkpoint.resume and self.checkpoint.save_dir is None:
            raise ValueError("checkpoint.resume needs checkpoint.save_dir (--save-dir)")
        d = self.data
        if d.prepared_data and (d.token_batches is not None or d.hf_dataset is not None):
            raise ValueError("data.prepared_data: pass it, data.hf_dataset or data.token_batches, not two of them")
        if d.data_weights and not d.prepared_data:
            raise ValueError("data.data_weights needs data.prepared_data (one weight per set)")
        if d.eval_split > 0 and not d.prepared_data:
            raise ValueError("data.eval_split holds out samples of data.prepared_data; without it use data.eval_data")
        if d.eval_split > 0 and d.eval_data is not None:
            raise ValueError("data.eval_split and data.eval_data: validate on one of them")
        if d.eval_interval and d.eval_split == 0 and d.eval_data is None:
            raise ValueError("data.eval_interval needs something to validate on: data.eval_split or data.eval_data")
        r = self.runtime
        if r.async_tp and (r.tp == 1 or r.resolved_device() != "cuda" or not r.resolved_compile()):
            raise ValueError(f"runtime.async_tp needs CUDA, runtime.tp > 1 and runtime.compile (here: device "
                             f"{r.resolved_device()}, tp {r.tp}, compile {r.resolved_compile()})")
        if self.runtime.cuda_graph and t.nan_policy == "skip":
            raise ValueError("runtime.cuda_graph with train.nan_policy skip: a captured step cannot skip itself "
                             "(use --nan-policy stop or --no-cuda-graph)")
        return self

    def grad_accum(self, world: int) -> int:
        """Micro batches per rank per step (`world`: the data-parallel ranks); raises EngineError when the global
        batch does not split."""
        t = self.train
        if t.global_batch_size % (t.micro_batch_size * world):
            raise EngineError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                              f"{t.micro_batch_size} x data-parallel size {world} = {t.micro_batch_size * world}")
        return t.global_batch_size // (t.micro_batch_size * world)


def build(**sections) -> EngineConfig:
    """EngineConfig from section values; validation errors become one EngineError naming each field."""
    return build_section(EngineConfig, **sections)


