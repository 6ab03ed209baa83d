"""`pretrain --prepared-data`: resume is exact across shard boundaries, validation reaches the log and the
sinks, bad input stops the run with an EngineError and loses nothing, a run config round-trips the new
options, and DP=2 trains the same global batches as DP=1 (torchrun, slow)."""

from __future__ import annotations

import json
import math
import random
import sys
import types

import numpy as np
import pytest

from .core_testlib import engine_import, read_jsonl, read_log, torchrun
from .engine_fixture import SMALL_RUN
from .test_prepared_data import VOCAB, prepared, shipped_tokenizer_plus

(ckpt,) = engine_import("core", "checkpoint")
(open_prepared,) = engine_import("data", "open_prepared")

SEQ, ROWS = 32, 4
TRAIN = [*SMALL_RUN, "--global-batch-size", str(ROWS), "--micro-batch-size", "2", "--lr-schedule", "cosine"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A prepared set of small shards (about 2 steps of tokens each): every few steps cross a shard boundary."""
    root = tmp_path_factory.mktemp("prepared")
    return prepared(root, "d", n_docs=160, docs_per_shard=5)


def run(cli, tmp_path, name, data, *extra, steps=6):
    """pretrain on the prepared set `data`, saving to tmp_path/name, logging to tmp_path/name.jsonl."""
    return cli(["pretrain", *TRAIN, "--num-steps", steps, "--prepared-data", data, "--save-dir", tmp_path / name,
                "--log-file", tmp_path / f"{name}.jsonl", *extra])


class FakeWriterModule:
    """A stand-in torch.utils.tensorboard whose one SummaryWriter records add_scalar calls."""

    def __init__(self):
        self.module = types.ModuleType("torch.utils.tensorboard")
        outer = self

        class Writer:
            def __init__(self, log_dir):
                self.scalars = []
                outer.writer = self

            def add_scalar(self, tag, value, step):
                self.scalars.append((tag, value, step))

            def flush(self):
                pass

            def close(self):
                pass

        self.module.SummaryWriter = Writer


def _crosses_a_shard(data_dir, seed: int, first: int, n: int) -> bool:
    """Whether training samples first .. first+n-1 of this seed include one that spans two shards."""
    data = open_prepared([str(data_dir)], None, None, 0.05, None, SEQ, seed, True, VOCAB)
    order = data.rows.components[0]
    samples = order.train_samples(np.arange(first, first + n))
    offsets = order.data.offsets
    return bool((np.searchsorted(offsets, samples * SEQ, "right") != np.searchsorted(offsets, samples * SEQ + SEQ, "right")).any())


def test_resume_is_exact_across_shard_boundaries(cli, tmp_path, data_dir):
    seed = random.randint(0, 2**31 - 1)
    while not _crosses_a_shard(data_dir, seed, 3 * ROWS, 3 * ROWS):  # the resumed steps read across a boundary
        seed += 1
    common = ["--seed", seed, "--eval-split", "0.05", "--eval-interval", "2", "--eval-iters", "2"]
    res = run(cli, tmp_path, "straight", data_dir, *common, "--save-interval", "3")
    assert res.exit_code == 0, res.output + res.stderr
    res = run(cli, tmp_path, "split", data_dir, *common, "--exit-after-steps", "3")
    assert res.exit_code == 0, res.output + res.stderr
    res = run(cli, tmp_path, "split", data_dir, *common, "--resume")
    assert res.exit_code == 0, res.output + res.stderr
    straight, split = read_log(tmp_path / "straight.jsonl"), read_log(tmp_path / "split.jsonl")
    assert [r["step"] for r in split] == list(range(1, 7))
    for key in ("loss", "grad_norm", "eval_loss"):
        assert [r.get(key) for r in straight] == [r.get(key) for r in split], key  # bitwise
    a = ckpt.load(tmp_path / "straight" / "step_00000006").master
    b = ckpt.load(tmp_path / "split" / "step_00000006").master
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_validation_in_the_log_and_the_sinks(cli, tmp_path, data_dir, monkeypatch):
    fake = FakeWriterModule()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake.module)
    res = run(cli, tmp_path, "ev", data_dir, "--eval-split", "0.1", "--eval-interval", "2", "--eval-iters", "3",
              "--tensorboard-dir", tmp_path / "tb", steps=5)
    assert res.exit_code == 0, res.output + res.stderr
    assert "[EVAL 2] eval_loss=" in res.stdout
    records = read_jsonl(tmp_path / "ev.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]  # every 2 steps and at the end
    for r in evals:
        assert "loss" in r and math.isfinite(r["eval_loss"]) and r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]))
        assert r["eval_tokens"] == 3 * ROWS * SEQ
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]  # the model moved between them
    tags = {(tag, step): value for tag, value, step in fake.writer.scalars}
    for r in evals:
        assert tags[("eval/loss", r["step"])] == r["eval_loss"] and tags[("eval/ppl", r["step"])] == r["eval_ppl"]
    assert ("eval/loss", 1) not in tags


def test_validation_on_a_separate_prepared_set(cli, tmp_path, data_dir):
    other = prepared(tmp_path, "val", n_docs=30, docs_per_shard=7)
    res = run(cli, tmp_path, "sep", data_dir, "--eval-data", other, "--eval-interval", "3", "--eval-iters", "1",
              steps=3)
    assert res.exit_code == 0, res.output + res.stderr
    (last,) = [r for r in read_jsonl(tmp_path / "sep.jsonl") if "eval_loss" in r]
    assert last["step"] == 3 and last["eval_tokens"] == ROWS * SEQ


def test_a_corrupt_shard_stops_the_run_and_keeps_the_last_checkpoint(cli, tmp_path, data_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    res = run(cli, tmp_path, "c", copy, "--exit-after-steps", "2")
    assert res.exit_code == 0, res.output + res.stderr
    for f in copy.glob("shard_*.tokens"):  # every shard: the next batch surely reads one
        data = np.fromfile(f, dtype=np.uint16)
        data[:] = np.random.default_rng().integers(VOCAB, 65_536, len(data))
        data.tofile(f)
    res = run(cli, tmp_path, "c", copy, "--resume")
    assert res.exit_code == 1
    assert "is corrupt" in res.stderr and "prepare-data --verify" in res.stderr, res.stderr
    assert ckpt.find_latest(tmp_path / "c").name == "step_00000002"
    assert sorted(p.name for p in (tmp_path / "c").glob("step_*")) == ["step_00000002"]


@pytest.mark.parametrize("bad", ["tokenizer", "weights", "truncated"])
def test_bad_input_fails_before_anything_is_written(cli, tmp_path, data_dir, bad):
    import shutil

    if bad == "tokenizer":
        other = shipped_tokenizer_plus(tmp_path, 0)
        (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "x": random.random()}))
        extra, want = ["--tokenizer-path", other], "is not the one prepared dataset"
    elif bad == "weights":
        extra, want = ["--prepared-data", data_dir, "--data-weights", "0.6", "--data-weights", "0.6"], "not normalized"
    else:
        copy = tmp_path / "copy"
        shutil.copytree(data_dir, copy)
        victim = copy / "shard_00003.tokens"
        victim.write_bytes(victim.read_bytes()[:-2])
        data_dir, extra, want = copy, [], "shard_00003.tokens is truncated"
    res = run(cli, tmp_path, "bad", data_dir, *extra, steps=2)
    assert res.exit_code == 1 and want in res.stderr, res.stderr
    assert not (tmp_path / "bad").exists()


def test_two_sets_mixed_train_and_the_run_config_keeps_the_mixture(cli, tmp_path, data_dir):
    other = prepared(tmp_path, "b", n_docs=60, docs_per_shard=9)
    res = run(cli, tmp_path, "mix", data_dir, "--prepared-data", other, "--data-weights", "0.7",
              "--data-weights", "0.3", steps=2)
    assert res.exit_code == 0, res.output + res.stderr
    assert f"0.7 x {data_dir} + 0.3 x {other}" in res.stdout
    toml = (tmp_path / "mix" / "config.toml").read_text()
    assert f'prepared_data = ["{data_dir}", "{other}"]' in toml and "data_weights = [0.7, 0.3]" in toml
    res = cli(["pretrain", "--config", tmp_path / "mix" / "config.toml", "--num-steps", "3", "--resume"])
    assert res.exit_code == 0, res.output + res.stderr
    assert [r["step"] for r in read_log(tmp_path / "mix.jsonl")] == [1, 2, 3]


@pytest.mark.slow
def test_dp2_trains_the_same_global_batches_as_dp1(tmp_path, data_dir):
    args = ["pretrain", *TRAIN, "--num-steps", "3", "--prepared-data", data_dir, "--seed", str(random.randint(0, 999)),
            "--eval-split", "0.05", "--eval-interval", "3", "--eval-iters", "2"]
    one = torchrun(1, [*args, "--log-file", tmp_path / "dp1.jsonl"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, [*args, "--log-file", tmp_path / "dp2.jsonl"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_jsonl(tmp_path / "dp1.jsonl"), read_jsonl(tmp_path / "dp2.jsonl")
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=1e-5)
    np.testing.assert_allclose(a[-1]["eval_loss"], b[-1]["eval_loss"], rtol=1e-5)
