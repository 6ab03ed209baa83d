"""Where step records go besides the console: one interface (`write(record)`, `close()`), three sinks.

- JSONL (`--log-file`): one line per step, appended, never truncated: a resumed run appends the steps
  after its checkpoint, so a step may appear twice; readers take a step's last line (and skip a line a
  kill cut short).
- TensorBoard (`--tensorboard-dir`): torch.utils.tensorboard's SummaryWriter (the `tensorboard` package).
- Weights & Biases (`--wandb-project`): only when asked for, and then the `wandb` package must be there.
The scalars: loss, lr, grad norm, tokens/s, MFU, step time, peak memory (tagged train/...), and on a step
that validated, eval_loss and eval_ppl (tagged eval/loss, eval/ppl). A missing package is an EngineError
naming it, raised by `check` before the first step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from .config import RunConfig
from .errors import EngineError

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "peak_mem_gib")
EVAL_SCALARS = ("eval_loss", "eval_ppl")  # present on the steps that validated


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:  # a line a kill cut short stays alone on its line
            if f.tell() > 0 and _last_byte(path) != b"\n":
                f.write(b"\n")
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def _scalars(record: dict) -> dict[str, float]:
    """Tag -> value: train/<key>, and eval/loss, eval/ppl on a step that validated."""
    out = {f"train/{k}": float(record[k]) for k in SCALARS if record.get(k) is not None}
    out.update({f"eval/{k.removeprefix('eval_')}": float(record[k]) for k in EVAL_SCALARS if k in record})
    return out


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        writer = _tensorboard_writer()
        self._writer = writer(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        for tag, value in _scalars(record).items():
            self._writer.add_scalar(tag, value, record["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    def __init__(self, project: str, config: dict):
        self._wandb = _wandb()
        self._run = self._wandb.init(project=project, config=config)

    def write(self, record: dict) -> None:
        self._run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self._run.finish()


def _tensorboard_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise EngineError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _wandb():
    try:
        import wandb
    except ImportError:
        raise EngineError("--wandb-project needs the wandb package: pip install wandb") from None
    return wandb


def check(cfg: RunConfig) -> None:
    """The packages the asked-for sinks need are importable (before any training state exists)."""
    if cfg.runtime.tensorboard_dir is not None:
        _tensorboard_writer()
    if cfg.runtime.wandb_project is not None:
        _wandb()


def open_sinks(cfg: RunConfig) -> list[Sink]:
    """Rank 0's sinks for this run."""
    rt, sinks = cfg.runtime, []
    try:
        if rt.log_file is not None:
            sinks.append(JsonlSink(rt.log_file))
        if rt.tensorboard_dir is not None:
            sinks.append(TensorBoardSink(rt.tensorboard_dir))
        if rt.wandb_project is not None:
            sinks.append(WandbSink(rt.wandb_project, cfg.model_dump(mode="json")))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
