"""The step as one CUDA graph (cuda_graph.py, `--cuda-graph`).

CPU: what is refused and how (a CPU run, a bad warm-up, an op that cannot take the LR on the device),
the deferred pointer tables of the Triton AdamW (carved from a reserve inside the context, filled on
exit, equal to the eager ones). GPU: a graphed run against the eager run of the same model, data and LR schedule, with
each of the CUDA ops that the graph must hold (SDPA or FA4 attention, unfused or quack MLP; Triton
AdamW), eager and compiled: the same losses, norms and weights, every step's result still readable
after later replays, and a changed batch shape refused."""

from __future__ import annotations

import engine_testlib  # noqa: F401 - puts the engine's src on sys.path
import pytest
import torch

from core_train_engine_0_5b.core_testlib import assert_graphed_matches_eager
from train_engine_0_5b.core.cuda_graph import GraphedStep
from train_engine_0_5b.core.dist import DistContext
from train_engine_0_5b.core.errors import EngineError
from train_engine_0_5b.core.optim import AdamW, Schedule
from train_engine_0_5b.core.trainer import Trainer
from train_engine_0_5b.minicpm.init import init_weights
from train_engine_0_5b.model import build_model
from train_engine_0_5b.model_config import MiniCPMConfig, preset
from train_engine_0_5b.ops.adamw import reference
from train_engine_0_5b.ops.registry import OpSelection, resolve
from train_engine_0_5b.parallelize import apply_compile, apply_recompute

triton_fused = pytest.importorskip("train_engine_0_5b.ops.adamw.triton_fused")

RUN = ["--num-steps", "1", "--global-batch-size", "2", "--micro-batch-size", "2"]


def _trainer(cfg: MiniCPMConfig, device: str, dtype: torch.dtype, adamw_op, *, compile: bool = False,
             schedule: Schedule | None = None, mb: int = 2, ops: str | None = None, recompute: str = "none",
             ctx: DistContext | None = None, bucket_mb: float = 25.0) -> Trainer:
    ops = resolve(OpSelection.parse(ops if ops is not None else "attention=sdpa"), device, dtype)
    model = build_model(cfg, ops, device, dtype)
    apply_recompute(model, recompute)
    if compile:
        apply_compile(model)
    opt = AdamW(dict(model.named_parameters()), init_weights(model.cfg, 0.1, seed=3), adamw_op=adamw_op,
                betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, master_dtype=torch.float32)
    schedule = schedule or Schedule("constant", 1e-3, 1e-3, 1, 10)
    return Trainer(model, opt, schedule, ctx or DistContext(device=torch.device(device)), micro_batch_size=mb,
                   grad_clip=0.05, master_dtype=torch.float32, bucket_mb=bucket_mb)


# ---- CPU: refusals ----------------------------------------------------------------------------------

def test_graphed_step_refuses_a_cpu_trainer():
    trainer = _trainer(preset("tiny"), "cpu", torch.float32, triton_fused.adamw_reference)
    with pytest.raises(EngineError, match="needs a CUDA device"):
        GraphedStep(trainer)


def test_pretrain_with_cuda_graph_on_a_cpu_fails_before_any_checkpoint(cli, tmp_path):
    from engine_testlib import TINY

    save = tmp_path / "s"
    res = cli(["pretrain", *TINY, *RUN, "--save-dir", save, "--cuda-graph"])
    assert res.exit_code != 0, res.output
    assert "--cuda-graph needs a CUDA device" in res.stderr, res.stderr
    assert not save.exists() or not any(save.iterdir())


def test_bench_with_cuda_graph_needs_two_warmup_steps(cli):
    res = cli(["bench", "--model", "tiny", "--device", "cpu", "--seq-length", "16", "--micro-batch-size", "2",
               "--steps", "1", "--warmup", "1", "--cuda-graph"])
    assert res.exit_code != 0, res.output
    assert "--warmup >= 2" in res.stderr, res.stderr


def test_what_a_graph_covers_and_what_runs_graphed_by_default():
    """Accumulation is captured (rows a multiple of the micro batch), by default too; more data-parallel ranks are
    captured when asked, not by default; rows that do not split into micro batches and tensor parallelism are
    refused."""
    from types import SimpleNamespace

    from train_engine_0_5b.core.cuda_graph import check, supported

    def fake(world: int = 1, tp=None):
        return SimpleNamespace(ctx=SimpleNamespace(device=torch.device("cuda"), world=world), tp=tp,
                               optimizer=SimpleNamespace(fused=True), micro_batch_size=2)

    check(fake(), 2)
    check(fake(), 6)
    check(fake(world=2), 2)
    check(fake(world=4), 6)
    with pytest.raises(EngineError, match="5 rows per step do not split into micro batches of 2"):
        check(fake(), 5)
    with pytest.raises(EngineError, match="tensor parallelism: the model's TP collectives are not captured"):
        check(fake(world=2, tp=SimpleNamespace(world=2)), 2)
    assert supported(fake(), 2) and supported(fake(), 6) and not supported(fake(), 5)
    assert not supported(fake(world=2), 2) and not supported(fake(world=2, tp=SimpleNamespace(world=2)), 2)


def test_step_function_graphs_what_is_asked_and_the_default_only_where_supported(monkeypatch):
    """runtime.cuda_graph True: checked, then graphed (a CPU trainer is refused before any step); None: graphed
    where `supported` and --nan-policy stop; False: never."""
    from types import SimpleNamespace

    from train_engine_0_5b.core import cuda_graph

    trainer = _trainer(preset("tiny"), "cpu", torch.float32, triton_fused.adamw_reference)

    def cfg(want, nan_policy="stop"):
        return SimpleNamespace(runtime=SimpleNamespace(cuda_graph=want), train=SimpleNamespace(nan_policy=nan_policy))

    with pytest.raises(EngineError, match="needs a CUDA device"):
        cuda_graph.step_function(trainer, cfg(True), 2)
    assert cuda_graph.step_function(trainer, cfg(None), 2) == (trainer.train_step, False)  # a CPU: not supported
    made = []
    monkeypatch.setattr(cuda_graph, "supported", lambda tr, rows: True)
    monkeypatch.setattr(cuda_graph, "GraphedStep", lambda tr, warmup: made.append(warmup) or "graphed")
    assert cuda_graph.step_function(trainer, cfg(None), 2, eager_steps=3) == ("graphed", True) and made == [3]
    assert cuda_graph.step_function(trainer, cfg(None, "skip"), 2) == (trainer.train_step, False)
    assert cuda_graph.step_function(trainer, cfg(False), 2) == (trainer.train_step, False)


def test_device_lr_needs_the_fused_op():
    trainer = _trainer(preset("tiny"), "cpu", torch.float32, reference.adamw)
    opt = trainer.optimizer
    grads = [torch.randn_like(p) for p in opt.params]
    with pytest.raises(ValueError, match="triton_fused"):
        opt.step(grads, torch.tensor(1e-3, dtype=torch.float64), 1.0)


# ---- CPU: the AdamW's deferred pointer tables ------------------------------------------------------

def test_deferred_tables_are_filled_on_exit_and_equal_the_eager_ones():
    gen = torch.Generator().manual_seed(0)
    lists = [[torch.randn(n, generator=gen) for n in (40, 8, 24)] for _ in range(3)]
    flags = [1, 0, 1]
    triton_fused._TABLES.clear()
    eager_plan, eager_tables, aligned = triton_fused._launch_tables(lists, flags)
    triton_fused._TABLES.clear()  # a miss again: inside the context it must defer
    reserve = torch.full((64,), -7, dtype=torch.int64)  # poison: what a capture would have seen
    with triton_fused.deferred_tables(reserve) as kept:
        plan, tables, aligned2 = triton_fused._launch_tables(lists, flags)
        assert kept == [] and (tables == -7).all()  # nothing filled before the exit
    assert torch.equal(plan, eager_plan) and aligned == aligned2  # the plan (sizes only) was a cache hit
    assert torch.equal(tables, eager_tables)
    assert len(kept) == 1 and kept[0] is tables
    assert tables.data_ptr() == reserve.data_ptr()  # carved from the reserve, not allocated
    assert torch.equal(tables[0], torch.tensor([t.data_ptr() for t in lists[0]]))


def test_deferred_tables_refuse_a_reserve_too_small_and_nesting():
    lists = [[torch.randn(4)] for _ in range(3)]
    triton_fused._TABLES.clear()
    with pytest.raises(RuntimeError, match="reserve holds 2 entries"):
        with triton_fused.deferred_tables(torch.empty(2, dtype=torch.int64)):
            triton_fused._launch_tables(lists, [0])
    with triton_fused.deferred_tables(torch.empty(8, dtype=torch.int64)):
        with pytest.raises(RuntimeError, match="nest"):
            with triton_fused.deferred_tables(torch.empty(8, dtype=torch.int64)):
                pass


# ---- GPU: graphed == eager -------------------------------------------------------------------------

GPU_CFG = MiniCPMConfig(  # head dim 64 and bf16: FA4 and the quack MLP run where installed
    name="graph-test", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=512,
    vocab_size=4096, max_seq_length=1024, tie_word_embeddings=True,
)


def _one_process_nccl_group():
    """The default process group as NCCL over this one process (an in-memory store, no launcher)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    return dist.group.WORLD


def _run_gpu(graphed: bool, ops: str, compile: bool, recompute: str = "none", steps: int = 7, accum: int = 1,
             dp: int = 1):
    """`dp` > 1: the trainer takes the data-parallel path (the reducer's buckets and async all-reduces, the count's
    and loss's all-reduces) over a NCCL group of this one process standing in for `dp` ranks: every sum is over one
    process, so the result is the one-rank run's (one GPU cannot hold two NCCL ranks)."""
    torch._dynamo.reset()
    ctx = DistContext(0, dp, 0, torch.device("cuda"), _one_process_nccl_group()) if dp > 1 else None
    # warm-up over 10 steps: the LR changes every step, so a graph that baked it in would drift
    trainer = _trainer(GPU_CFG, "cuda", torch.bfloat16, triton_fused.adamw, compile=compile,
                       schedule=Schedule("constant", 3e-4, 3e-4, 10, 20), ops=ops, recompute=recompute, ctx=ctx,
                       bucket_mb=1.0 if dp > 1 else 25.0)  # several buckets, launched in order under capture
    start = [m.clone() for m in trainer.optimizer.master]
    step = GraphedStep(trainer, warmup=2) if graphed else trainer.train_step
    gen = torch.Generator().manual_seed(1)
    results = []
    for _ in range(steps):  # `accum` micro batches of 2 rows per step
        ids = torch.randint(0, GPU_CFG.vocab_size, (2 * accum, 256), generator=gen)
        labels = torch.roll(ids, -1, 1)
        labels[0, :7] = -100
        results.append(step(ids.cuda(), labels.cuda()))
    torch.cuda.synchronize()
    # read only now: each step's scalars must have survived every later replay
    losses = [r.loss.item() for r in results]
    norms = [r.grad_norm.item() for r in results]
    counts = [int(r.valid_tokens) for r in results]
    return dict(losses=losses, norms=norms, counts=counts, start=start, trainer=trainer, step=step,
                lrs=[r.lr for r in results], master=[m.clone() for m in trainer.optimizer.master])


GPU_VARIANTS = {  # id: (ops, compile, recompute[, micro batches per step[, data-parallel stand-in ranks]]); "default":
    # the CUDA defaults (FA4, quack MLP where installed)
    "plain-eager": ("attention=sdpa,mlp=unfused", False, "none"),
    "plain-compiled": ("attention=sdpa,mlp=unfused", True, "none"),
    "flash4": ("attention=flash4,mlp=unfused", True, "none"),
    "quack": ("attention=sdpa,mlp=quack_gated", True, "none"),
    "quack-dgated": ("attention=sdpa,mlp=quack_dgated", True, "none"),
    "linear-ce-quack": ("linear_cross_entropy=quack_triton", True, "none"),
    "triton-ce": ("cross_entropy=triton_fused", True, "none"),
    "linear-ce": ("linear_cross_entropy=triton_fused", True, "none"),  # custom ops allocating inside the graph
    "qkv-rope": ("qkv_rope=triton_fused", True, "none"),
    "residual-reference": ("residual_scale=reference", True, "none"),  # the default places r on weights
    "recompute-layer": ("", True, "layer"),  # the recomputed forward runs inside the captured backward
    "default": ("", True, "none"),
    "plain-compiled-accum3": ("attention=sdpa,mlp=unfused", True, "none", 3),  # the reducer's fp32 sums in the graph
    "default-accum2": ("", True, "none", 2),
    "dp-stand-in": ("attention=sdpa,mlp=unfused", True, "none", 2, 2),  # NCCL collectives in the graph (_run_gpu)
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
def test_graphed_run_matches_the_eager_run(variant, monkeypatch):
    ops, compile, recompute, accum, dp = (*GPU_VARIANTS[variant], 1, 1)[:5]
    try:
        resolve(OpSelection.parse(ops), "cuda", torch.bfloat16)
    except EngineError as e:  # FA4 / quack not installed here
        pytest.skip(str(e))
    eager = _run_gpu(False, ops, compile, recompute, accum=accum)  # one rank: what the stand-in must reproduce
    if dp > 1:
        import torch.distributed as dist

        capturing: list[bool] = []  # per all-reduce call: issued while the graph was being captured
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: capturing.append(
            torch.cuda.is_current_stream_capturing()) or real(*a, **k))
        try:
            graphed = _run_gpu(True, ops, compile, recompute, accum=accum, dp=dp)
        finally:
            dist.destroy_process_group()
        per_step = 2 + len(graphed["trainer"].reducer.buckets)  # the count, each bucket, the loss
        assert len(graphed["trainer"].reducer.buckets) > 1
        # 2 eager warm-up steps and the capture called them; the 5 replays called none: they are in the graph
        assert capturing == [False] * 2 * per_step + [True] * per_step
    else:
        graphed = _run_gpu(True, ops, compile, recompute, accum=accum)
    assert_graphed_matches_eager(graphed, eager, steps=7, valid_tokens=2 * accum * 256 - 7)
    for p, m in zip(graphed["trainer"].model.parameters(), graphed["master"]):  # bf16 copies written back
        assert torch.equal(p.detach(), m.to(p.dtype))
    with pytest.raises(EngineError, match="batch shape changed"):
        graphed["step"](torch.zeros(2, 128, dtype=torch.long, device="cuda"),
                        torch.zeros(2, 128, dtype=torch.long, device="cuda"))
