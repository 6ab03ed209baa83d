"""Helpers for the engine's tests (CPU, tiny model); imported as `engine_testlib` (a name no other
test folder uses, so the repository-wide pytest run cannot confuse it with another module).

Importing it puts the engine's src/ on sys.path (the tests run without installing the engine); the helpers it
shares with the core's tests are core_train_engine_0_5b/core_testlib.py's (vendored from the workspace). Nothing
here or in these tests imports the forge workspace: they pass from an unpacked copy of the export alone.
The workspace's own tests of this engine against its reference live in the workspace (tests/engines/).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1]
SRC = ENGINE / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

# the helpers the core's tests share (vendored beside them; ADAMW_STEP_SHARE: the gates' AdamW step cap share)
from core_train_engine_0_5b.core_testlib import one_thread  # noqa: E402, F401 - re-exported for conftest
from core_train_engine_0_5b.core_testlib import (ADAMW_STEP_SHARE, assert_adamw_weights_close,  # noqa: E402, F401
                                                 engine_env, read_jsonl, read_log, rel_err, torchrun)
from core_train_engine_0_5b.engine_fixture import SMALL_RUN  # noqa: E402

# Small enough for a slow 2-core CPU: the tiny preset (vocab 4096 = the shipped tokenizer's).
TINY = SMALL_RUN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny(selection: str, device: str, ignore_first: int = 0) -> tuple[list[float], list[float], dict, list[float]]:
    """The tiny model (output weight tied to the embedding) trained 2 steps of 2 micro batches of 2 rows each
    (gradients accumulated across them), fp32, the ops `selection` (`--ops` form) on `device`, weights from seed 3,
    tokens from seed 1, labels the next token with the first `ignore_first` of row 0 ignored.
    Returns (losses, gradient norms, fp32 master weights by index, the steps' learning rates); asserts that each
    op named in `selection` resolved to the implementation named there."""
    import torch

    from train_engine_0_5b.core.dist import DistContext
    from train_engine_0_5b.minicpm.init import init_weights
    from train_engine_0_5b.model import build_model
    from train_engine_0_5b.model_config import preset
    from train_engine_0_5b.ops.cross_entropy.reference import IGNORE_INDEX
    from train_engine_0_5b.ops.registry import OpSelection, resolve
    from train_engine_0_5b.core.optim import AdamW, Schedule
    from train_engine_0_5b.core.trainer import Trainer

    cfg = preset("tiny")
    assert cfg.tie_word_embeddings
    ops = resolve(OpSelection.parse(selection), device, torch.float32)
    for item in selection.split(","):
        op, _, impl = item.partition("=")
        assert ops.names[op] == impl, (op, ops.names[op])
    model = build_model(cfg, ops, device, torch.float32)
    opt = AdamW(dict(model.named_parameters()), init_weights(model.cfg, 0.1, seed=3), adamw_op=ops.adamw,
                betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, master_dtype=torch.float32)
    trainer = Trainer(model, opt, Schedule("constant", 3e-3, 3e-3, 1, 2), DistContext(device=torch.device(device)),
                      micro_batch_size=2, grad_clip=1.0, master_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    losses, norms, lrs = [], [], []
    for _ in range(2):
        ids = torch.randint(0, cfg.vocab_size, (4, 9), generator=gen).to(device)
        labels = torch.roll(ids, -1, 1)
        labels[0, :ignore_first] = IGNORE_INDEX
        res = trainer.train_step(ids, labels)
        losses.append(res.loss.item())
        norms.append(res.grad_norm.item())
        lrs.append(res.lr)
    return losses, norms, {i: w.clone() for i, w in enumerate(opt.master)}, lrs


def assert_same_training(fused: tuple, unfused: tuple) -> None:
    """Two train_tiny runs that differ in fp32 summation order only: losses within 1e-5, gradient norms within
    1e-4 (relative), the weights as assert_adamw_weights_close holds them."""
    import torch

    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(fused[1], unfused[1], rtol=1e-4, atol=0)
    assert fused[3] == unfused[3]
    assert_adamw_weights_close(unfused[2], fused[2], unfused[3])


@pytest.fixture
def cli():
    """Run the engine's CLI in this process: cli(args, env=None) -> click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from train_engine_0_5b.cli import app

    runner = CliRunner()

    def invoke(args: list, env: dict | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)

    return invoke


def sm90() -> bool:
    """A Hopper (or newer) GPU is here: what the flash4 and quack_gated kernel tests need."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
