"""The 8B's step as the core's CUDA graph (core/cuda_graph.py; `pretrain --cuda-graph`, on by default at TP=1 on
one GPU). CPU: `step_function` on a CPU trainer refuses a graph when asked and runs eagerly by default. GPU: at
TP=1, the reduced 8B (head dim 128, GQA, untied) in bf16, compiled, graphed against the eager run of the same
weights, data and LR schedule: the same losses, norms and weights, every step's result readable after later
replays. Under tensor parallelism the graph is refused (the core's test of `check`)."""

from __future__ import annotations

import pytest
import torch

from core_train_engine_8b.core_testlib import assert_graphed_matches_eager
from train_engine_8b import config
from train_engine_8b.build import build_trainer
from train_engine_8b.core.cuda_graph import step_function
from train_engine_8b.core.dist import DistContext
from train_engine_8b.core.errors import EngineError
from train_engine_8b.model_config import preset
from train_engine_8b.ops.registry import OpSelection, resolve

SEQ, MICRO, STEPS = 256, 2, 7


def _cfg(device: str, ops: str = "", *, accum: int = 1, compile: bool = False, cuda_graph: bool | None = None):
    # warm-up over 10 steps: the LR changes every step, so a graph that baked it in would drift
    return config.build(model=preset("minicpm4-8b-reduced"), ops=OpSelection.parse(ops),
                        train=dict(num_steps=STEPS, global_batch_size=MICRO * accum, micro_batch_size=MICRO,
                                   seq_length=SEQ, seed=3),
                        optim=dict(lr_schedule="constant", lr=3e-4, min_lr=3e-4, warmup_steps=10, grad_clip=0.05),
                        runtime=dict(device=device, compile=compile, cuda_graph=cuda_graph))


def test_a_cpu_trainer_is_refused_a_graph_and_runs_eagerly_by_default():
    cfg = _cfg("cpu", cuda_graph=True)
    trainer = build_trainer(cfg, DistContext(), dtype=torch.float32)
    with pytest.raises(EngineError, match="--cuda-graph needs a CUDA device"):
        step_function(trainer, cfg, MICRO)
    assert step_function(trainer, _cfg("cpu"), MICRO) == (trainer.train_step, False)


def _run_gpu(graphed: bool, ops: str, accum: int) -> dict:
    torch._dynamo.reset()
    cfg = _cfg("cuda", ops, accum=accum, compile=True, cuda_graph=graphed)
    trainer = build_trainer(cfg, DistContext(device=torch.device("cuda")), dtype=torch.bfloat16)
    start = [m.clone() for m in trainer.optimizer.master]
    step, is_graph = step_function(trainer, cfg, MICRO * accum)
    assert is_graph == graphed
    vocab = cfg.model.vocab_size
    gen = torch.Generator().manual_seed(1)
    results = []
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (MICRO * accum, SEQ), generator=gen)
        labels = torch.roll(ids, -1, 1)
        labels[0, :7] = -100
        results.append(step(ids.cuda(), labels.cuda()))
    torch.cuda.synchronize()
    return dict(losses=[r.loss.item() for r in results], norms=[r.grad_norm.item() for r in results],
                counts=[int(r.valid_tokens) for r in results], lrs=[r.lr for r in results], start=start,
                trainer=trainer, step=step, master=[m.clone() for m in trainer.optimizer.master])


GPU_VARIANTS = {"sdpa": ("attention=sdpa", 1), "default": ("", 1), "default-accum2": ("", 2)}  # id: (ops, accum)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
def test_graphed_step_matches_the_eager_step(variant):
    ops, accum = GPU_VARIANTS[variant]
    try:
        resolve(OpSelection.parse(ops), "cuda", torch.bfloat16)
    except EngineError as e:  # FA4 not installed here
        pytest.skip(str(e))
    eager = _run_gpu(False, ops, accum)
    graphed = _run_gpu(True, ops, accum)
    assert_graphed_matches_eager(graphed, eager, steps=STEPS, valid_tokens=MICRO * accum * SEQ - 7)
    with pytest.raises(EngineError, match="batch shape changed"):
        graphed["step"](torch.zeros(MICRO * accum, SEQ // 2, dtype=torch.long, device="cuda"),
                        torch.zeros(MICRO * accum, SEQ // 2, dtype=torch.long, device="cuda"))
