"""The batch prefetcher (the batches of Loader.batch, in order, built on a background thread; an error
there raised in the consumer; no thread left behind; nothing built past the last step) and the
pretrain loop that reads each step's scalars one step late: the same log as the synchronous loop."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch

from .core_testlib import engine_import, read_jsonl
from .engine_fixture import SMALL_RUN

pretrain_mod = engine_import("core.pretrain")  # the shared loop
step_reports = engine_import("core.step_reports")
Loader, PackedRows, Prefetcher, TokenStream = engine_import("data", "Loader", "PackedRows", "Prefetcher", "TokenStream")
Source, renderer = engine_import("data.sources", "Source", "renderer")
TextTokenizer = engine_import("data.tokenizer").TextTokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "tensor", "kernel", "norm", "rope", "swiglu", "adam"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stream() -> TokenStream:
    docs = [" ".join(random.choices(WORDS, k=random.randint(3, 40))) for _ in range(11)]
    source = Source("test", ["text"], len(docs), lambda: iter([{"text": docs}]))
    return TokenStream.build(source, renderer(source, None), TextTokenizer())


def loader(stream: TokenStream, rank: int = 0, world: int = 1, seed: int = 5) -> Loader:
    """A fresh loader (its own epoch cache, as a resumed process has): seq 16, global batch 4."""
    return Loader(PackedRows(stream, 16, seed=seed, shuffle=True), 4, rank, world)


class Counting:
    """Loader.batch, recording every step it is asked for (and optionally slow or failing at one step)."""

    def __init__(self, inner: Loader, fail_at: int | None = None, delay_s: float = 0.0):
        self.inner, self.fail_at, self.delay_s, self.steps = inner, fail_at, delay_s, []

    def __call__(self, step: int):
        self.steps.append(step)
        time.sleep(self.delay_s)
        if step == self.fail_at:
            raise_broken_rows(step)
        return self.inner.batch(step)


class BrokenRows(RuntimeError):
    pass


def raise_broken_rows(step: int) -> None:
    raise BrokenRows(f"row data of step {step} is unreadable")


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_prefetched_batches_equal_loader_batches_from_a_resume_step(stream, rank, world):
    start, stop = 7, 7 + 3 * stream.tokens.size // 64  # a resume mid-run, spanning epochs (64 tokens a step)
    with Prefetcher(loader(stream, rank, world).batch, start, stop, CPU) as batches:
        got = [batches.get(step) for step in range(start, stop)]
    reference = loader(stream, rank, world)
    for step, batch in zip(range(start, stop), got):
        want = reference.batch(step)
        assert len(batch) == 2 and all(torch.equal(a, b) for a, b in zip(batch, want)), step
        assert not batch[0].is_pinned()  # pinned only for a CUDA device


def test_nothing_is_built_past_the_last_step(stream):
    batch = Counting(loader(stream))
    with Prefetcher(batch, 3, 9, CPU) as batches:
        for step in range(3, 9):
            batches.get(step)
        time.sleep(0.2)  # give a runaway thread the time to build step 9
        with pytest.raises(ValueError, match="step 9"):
            batches.get(9)
    assert batch.steps == list(range(3, 9))


def test_a_worker_exception_is_raised_by_get_with_its_traceback(stream):
    batch = Counting(loader(stream), fail_at=5)
    with Prefetcher(batch, 2, 10, CPU) as batches:
        for step in (2, 3, 4):
            assert torch.equal(batches.get(step)[0], loader(stream).batch(step)[0])
        with pytest.raises(BrokenRows, match="step 5") as info:
            batches.get(5)
        assert not batches._thread.is_alive()
        with pytest.raises(RuntimeError, match="closed"):
            batches.get(6)
    frames = [entry.name for entry in info.traceback]
    assert "get" in frames and "_work" in frames and frames[-1] == "raise_broken_rows"  # the thread's frames
    assert any("prefetch thread" in note and "step 5" in note for note in info.value.__notes__)
    assert batch.steps == [2, 3, 4, 5]  # it stopped at the failure


def test_close_stops_the_thread_when_the_consumer_stops_early(stream):
    batch = Counting(loader(stream), delay_s=0.02)
    batches = Prefetcher(batch, 0, 1000, CPU, depth=2)
    batches.get(0)
    time.sleep(0.2)  # the queue fills: the thread blocks on put
    batches.close()
    assert not batches._thread.is_alive()
    assert batches._thread.daemon  # even without close() it could not hold the interpreter at exit
    assert len(batch.steps) <= 1 + 2 + 1  # the one consumed, a full queue, the one being put
    batches.close()  # idempotent


def test_leaving_the_with_block_on_an_error_stops_the_thread(stream):
    before = threading.active_count()
    with pytest.raises(KeyError):
        with Prefetcher(Counting(loader(stream), delay_s=0.05), 0, 1000, CPU) as batches:
            batches.get(0)
            raise KeyError("the training step failed")
    assert not batches._thread.is_alive() and threading.active_count() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_for_a_cuda_device_are_pinned(stream):
    with Prefetcher(loader(stream).batch, 4, 8, torch.device("cuda", torch.cuda.current_device())) as batches:
        got = [batches.get(step) for step in range(4, 8)]
    for step, batch in zip(range(4, 8), got):
        assert all(x.is_pinned() and torch.equal(x, y) for x, y in zip(batch, loader(stream).batch(step)))
        on_device = [x.to("cuda", non_blocking=True) for x in batch]
        assert all(torch.equal(d.cpu(), y) for d, y in zip(on_device, loader(stream).batch(step)))


def synchronous_loop(cfg, ctx, trainer, train_step, loader, data, log, start, skipped, ops):
    """The loop before prefetching and late reads (no checkpoints): build, copy, step, read, log."""
    t = cfg.train
    tokens = t.global_batch_size * t.seq_length
    losses = []
    for step in range(start, t.num_steps):
        ids, labels = (x.to(ctx.device) for x in loader.batch(step))
        res = trainer.train_step(ids, labels)
        losses.append(float(res.loss))
        log.step({"step": step + 1, "loss": losses[-1], "grad_norm": float(res.grad_norm), "lr": res.lr, "tokens": tokens,
                  "valid_tokens": int(res.valid_tokens), "step_time_s": 1.0, "tokens_per_s": 1.0, "mfu": 0.0,
                  "tflops_per_gpu": 0.0, "peak_mem_gib": 0.0})
    return {"losses": losses}


def test_pretrain_log_matches_the_synchronous_loop(cli, tmp_path, monkeypatch):
    args = [*SMALL_RUN, "--num-steps", "5", "--global-batch-size", "4", "--micro-batch-size", "2",
            "--seed", str(random.randint(0, 2**31 - 1))]
    with monkeypatch.context() as m:
        m.setattr(pretrain_mod, "_loop", synchronous_loop)
        res = cli(["pretrain", *args, "--log-file", tmp_path / "sync.jsonl"])
        assert res.exit_code == 0, res.output + res.stderr
    # Checkpoints drain the held step: at 2 (interval) and 3 (the stop), then the run stops.
    res = cli(["pretrain", *args, "--log-file", tmp_path / "late.jsonl", "--save-dir", tmp_path / "save",
               "--save-interval", "2", "--exit-after-steps", "3", "--summary-json", tmp_path / "summary.json"])
    assert res.exit_code == 0, res.output + res.stderr
    sync, late = read_jsonl(tmp_path / "sync.jsonl"), read_jsonl(tmp_path / "late.jsonl")
    assert [r["step"] for r in late] == [1, 2, 3]
    assert all(list(r) == list(sync[0]) for r in late)  # the same fields, in the same order
    for key in ("loss", "grad_norm", "lr", "tokens", "valid_tokens"):
        assert [r[key] for r in late] == [r[key] for r in sync[:3]], key
    assert all(r["step_time_s"] > 0 and r["tokens_per_s"] > 0 for r in late)
    out = res.output
    assert out.index("[STEP 2]") < out.index("step_00000002") < out.index("[STEP 3]") < out.index("step_00000003")
    assert out.index("step_00000003") < out.index("stopping after 3 steps")
    assert sorted(p.name for p in (tmp_path / "save").iterdir()) == ["config.toml", "latest", "step_00000002", "step_00000003"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["losses"] == [r["loss"] for r in late] and summary["steps"] == 3 and summary["first_step"] == 1
    assert summary["step_time_s"] > 0


def test_a_failing_step_still_logs_the_steps_before_it(cli, tmp_path, monkeypatch):
    Trainer = engine_import("core.trainer").Trainer

    real, calls = Trainer.train_step, []

    def train_step(self, ids, labels):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("step 3 blew up")
        return real(self, ids, labels)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    res = cli(["pretrain", *SMALL_RUN, "--num-steps", "5", "--global-batch-size", "2", "--micro-batch-size", "2",
               "--log-file", tmp_path / "log.jsonl"])
    assert isinstance(res.exception, FloatingPointError)
    assert [r["step"] for r in read_jsonl(tmp_path / "log.jsonl")] == [1, 2]  # step 2 was held when step 3 failed
    assert not [t for t in threading.enumerate() if t.name == "batch-prefetch"]


def _result(device: str, loss: float, norm: float, valid: int):
    StepResult = engine_import("core.trainer").StepResult

    return StepResult(torch.tensor(loss, device=device), torch.tensor(norm, device=device), 1e-3,
                      torch.tensor(valid, device=device))


def test_staged_scalars_on_the_cpu_are_the_step_values():
    staged = step_reports.Staged(_result("cpu", 2.375, 0.5, 77))
    assert staged.event is None and staged.read() == (2.375, 0.5, 77)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_staged_read_waits_for_its_own_step_only():
    """Step N's scalars are read while step N+1 (here: ~1 s of spinning queued after it) still runs: the
    completion time logged for step N is step N's, and the last step's is not ~0 ms."""
    torch.cuda.synchronize()
    staged = step_reports.Staged(_result("cuda", 2.375, 0.5, 77))
    torch.cuda._sleep(2_000_000_000)  # "step N+1", queued behind the copy (~1 s at ~2 GHz)
    assert staged.read() == (2.375, 0.5, 77)
    assert not torch.cuda.current_stream().query()  # the read did not wait for step N+1
    torch.cuda.synchronize()
