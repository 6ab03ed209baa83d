"""`python -m train_engine_8b pretrain | export-hf | dump-state` with the training contract's options (the gates'
form: --init-from a HF MiniCPM directory, --token-batches, ...), on the reduced 8B, float32 (the engine's CPU
default), subprocesses (torchrun over gloo for 2 ranks).

- default tier: one process (TP=1): train, checkpoint, dump-state, export-hf read back by transformers; refusals.
- slow (each torchrun run ~15-20 s on 2 shared cores): TP=2 trains as TP=1, --exit-after-steps + --resume at
  TP=2 equals the straight TP=2 run bit for bit (log and state), a TP=2 checkpoint resumed at TP=1 and a TP=1
  one at TP=2 continue as the run that wrote it, the export of a TP=2 checkpoint gives transformers the
  engine's logits.

fp32 across layouts: step 1's loss agrees to ~1e-7 relative; AdamW then amplifies fp32 rounding (its first
updates are g / (|g| + eps), so a gradient element near zero flips by up to lr), and by step 6 at lr 1e-2 the
losses differ by up to ~5e-5 relative (measured). The float64 comparison (test_8b_trainer.py) holds 1e-12.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from train_engine_8b.minicpm.hf_config import to_hf_minicpm_config
from train_engine_8b.minicpm.init import init_weights
from train_engine_8b.model_config import preset

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS, ROWS, SEQ = 6, 4, 32


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", FORGE_ENGINE_PROGRESS="0")


def engine(nproc: int, args: list, cwd: Path) -> subprocess.CompletedProcess:
    """The engine's CLI in `nproc` processes (torchrun, standalone) or one plain process."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
              if nproc > 1 else [sys.executable])
    return subprocess.run([*launch, "-m", "train_engine_8b", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A HF MiniCPM directory of the reduced 8B (fresh weights) and STEPS token batches (pad tokens, ignored labels)."""
    d = tmp_path_factory.mktemp("inputs")
    cfg = preset("minicpm4-8b-reduced")
    seed = int(torch.randint(0, 2**30, ()))
    (d / "init").mkdir()
    (d / "init" / "config.json").write_text(json.dumps(to_hf_minicpm_config(cfg), indent=2))
    save_file({k: v.contiguous() for k, v in init_weights(cfg, 0.1, seed).items()}, str(d / "init" / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (STEPS, ROWS, SEQ), generator=gen)
    ids[:, :, ::9] = cfg.pad_token_id
    labels = torch.randint(0, cfg.vocab_size, (STEPS, ROWS, SEQ), generator=gen)
    labels[:, 1, :6] = -100
    save_file({"input_ids": ids, "labels": labels}, str(d / "batches.safetensors"))
    return d


def pretrain_args(d: Path, name: str, *extra) -> list:
    return ["pretrain", "--init-from", d / "init", "--token-batches", d / "batches.safetensors",
            "--num-steps", STEPS, "--global-batch-size", ROWS, "--micro-batch-size", 1, "--seq-length", SEQ,
            "--lr", 0.01, "--min-lr", 0.001, "--warmup-steps", 2, "--lr-schedule", "wsd", "--weight-decay", 0.1,
            "--grad-clip", 1.0, "--seed", 3, "--device", "cpu", "--save-dir", d / name, "--log-file",
            d / f"{name}.jsonl", *extra]


def _dump(d: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    out = d / f"dump-{checkpoint.parent.name}-{checkpoint.name}"
    _ok(engine(1, ["dump-state", "--checkpoint", checkpoint, "--out", out], d))
    return load_file(str(out / "tensors.safetensors"))


def _assert_logits_in_transformers(d: Path, checkpoint: Path, out: str, state: dict[str, torch.Tensor]) -> None:
    """export-hf (llama layout) of `checkpoint`, loaded by transformers, gives the logits of the engine's model
    holding the checkpoint's weights (`state`: its dump-state)."""
    transformers = pytest.importorskip("transformers")
    from train_engine_8b.model import MiniCPM
    from train_engine_8b.state_dict_adapter import load_hf

    _ok(engine(1, ["export-hf", "--checkpoint", checkpoint, "--out", d / out], d))
    cfg = preset("minicpm4-8b-reduced")
    ours = MiniCPM(cfg).eval()
    load_hf(ours, cfg, {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")})
    llama = transformers.LlamaForCausalLM.from_pretrained(d / out, torch_dtype=torch.float32).eval()
    ids = load_file(str(d / "batches.safetensors"))["input_ids"][0]
    with torch.no_grad():
        want, got = ours(ids), llama(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-4  # fp32, transformers' own RoPE and norm order


def test_pretrain_one_process_dump_and_export(inputs):
    d = inputs
    res = _ok(engine(1, pretrain_args(d, "tp1", "--save-interval", 3), d))
    assert "saved checkpoint" in res.stdout
    log = _log(d / "tp1.jsonl")
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(r["loss"] > 1.0 and r["grad_norm"] > 0 for r in log)
    written = (d / "tp1" / "config.toml").read_text()  # the resolved run config, itself a valid --config
    assert "[runtime]" in written and "tp = 1" in written and "train_engine_8b pretrain --config" in written
    state = _dump(d, d / "tp1")
    assert state["weight.model.embed_tokens.weight"][2].abs().max() == 0  # the padding row stays zero
    assert {"exp_avg.lm_head.weight", "exp_avg_sq.model.norm.weight"} <= set(state)
    _assert_logits_in_transformers(d, d / "tp1", "hf-tp1", state)


def test_config_file_sets_tp(inputs, tmp_path):
    """--config: a TOML's [runtime] tp is the run's, and an option on the command line overrides the file."""
    d = inputs
    (tmp_path / "run.toml").write_text('model = "minicpm4-8b-reduced"\n[runtime]\ntp = 3\n')
    res = engine(1, [*pretrain_args(d, "cfg-tp"), "--config", tmp_path / "run.toml"], d)
    assert res.returncode == 1 and "--tp 3 does not divide the world size (1 ranks)" in res.stderr


def test_bad_tp_degree_is_one_line(inputs):
    d = inputs
    res = engine(1, pretrain_args(d, "bad-tp", "--tp", 3), d)
    assert res.returncode == 1 and "--tp 3 does not divide the world size (1 ranks)" in res.stderr
    assert not (d / "bad-tp").exists() or not any((d / "bad-tp").glob("step_*"))


@pytest.fixture(scope="module")
def tp_runs(inputs):
    """TP=2 straight (checkpoints at 3 and 6), TP=2 split (--exit-after-steps 3, then --resume), TP=1 straight,
    TP=1 resumed from TP=2's step 3, TP=2 resumed from TP=1's step 3."""
    d = inputs
    _ok(engine(2, pretrain_args(d, "tp2", "--tp", 2, "--save-interval", 3), d))
    _ok(engine(2, pretrain_args(d, "tp2-split", "--tp", 2, "--exit-after-steps", 3), d))
    resumed = _ok(engine(2, pretrain_args(d, "tp2-split", "--tp", 2, "--resume"), d))
    _ok(engine(1, pretrain_args(d, "tp1-ref", "--save-interval", 3), d))
    for src, dst in (("tp2", "tp1-from-tp2"), ("tp1-ref", "tp2-from-tp1")):
        (d / dst).mkdir()
        shutil.copytree(d / src / "step_00000003", d / dst / "step_00000003")
        (d / dst / "latest").write_text("step_00000003\n")
        shutil.copy(d / f"{src}.jsonl", d / f"{dst}.jsonl")
    across = [_ok(engine(1, pretrain_args(d, "tp1-from-tp2", "--resume"), d)),
              _ok(engine(2, pretrain_args(d, "tp2-from-tp1", "--tp", 2, "--resume"), d))]
    return {"dir": d, "resumed": resumed, "across": across}


def _losses(d: Path, name: str) -> list[float]:
    by_step = {r["step"]: r for r in _log(d / f"{name}.jsonl")}  # a resumed log's last line per step
    return [by_step[s]["loss"] for s in range(1, STEPS + 1)] + [by_step[s]["grad_norm"] for s in range(1, STEPS + 1)]


def _assert_fp32_close(a: list[float], b: list[float]) -> None:
    """Losses then grad norms of two runs on other layouts (module doc: step 1 tight, then AdamW's drift)."""
    assert abs(a[0] - b[0]) / b[0] < 1e-6 and abs(a[STEPS] - b[STEPS]) / b[STEPS] < 1e-5
    assert all(abs(x - y) / abs(y) < 5e-4 for x, y in zip(a, b))


@pytest.mark.slow
def test_tp2_trains_as_tp1(tp_runs):
    d = tp_runs["dir"]
    _assert_fp32_close(_losses(d, "tp2"), _losses(d, "tp1-ref"))


@pytest.mark.slow
def test_tp2_exit_and_resume_is_bitwise(tp_runs):
    d = tp_runs["dir"]
    assert "resumed from" in tp_runs["resumed"].stdout
    assert _losses(d, "tp2-split") == _losses(d, "tp2")
    a, b = _dump(d, d / "tp2-split"), _dump(d, d / "tp2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_across_tp_layouts(tp_runs):
    d = tp_runs["dir"]
    assert all("TP=" in r.stdout and "not bit-identical" in r.stdout for r in tp_runs["across"])
    for name, ref in (("tp1-from-tp2", "tp2"), ("tp2-from-tp1", "tp1-ref")):
        a, b = _losses(d, name), _losses(d, ref)
        assert a[:3] == b[:3]  # the copied log of the steps before the checkpoint
        _assert_fp32_close(a, b)


@pytest.mark.slow
def test_export_of_tp2_checkpoint_in_transformers(tp_runs):
    d = tp_runs["dir"]
    _assert_logits_in_transformers(d, d / "tp2", "hf-tp2", _dump(d, d / "tp2"))


@pytest.mark.slow
def test_prepared_data_and_validation_at_tp2(tmp_path):
    """prepare-data (the shipped corpus), then pretrain on it with a held-out split validated every 3 steps:
    TP=2's training and validation losses follow TP=1's (fp32; each validation counts the DP group's tokens
    once, not once per TP rank)."""
    corpus = SRC / "train_engine_8b" / "data" / "default_corpus.jsonl.gz"
    _ok(engine(1, ["prepare-data", "--input", corpus, "--out", tmp_path / "prep", "--workers", 1], tmp_path))
    args = ["pretrain", "--model", "minicpm4-8b-reduced", "--device", "cpu", "--seq-length", 64, "--global-batch-size", 4,
            "--micro-batch-size", 2, "--num-steps", 6, "--warmup-steps", 2, "--lr", 3e-3, "--prepared-data",
            tmp_path / "prep", "--eval-split", 0.05, "--eval-interval", 3, "--eval-iters", 2]
    _ok(engine(2, [*args, "--tp", 2, "--log-file", tmp_path / "tp2.jsonl"], tmp_path))
    _ok(engine(1, [*args, "--log-file", tmp_path / "tp1.jsonl"], tmp_path))
    a, b = _log(tmp_path / "tp2.jsonl"), _log(tmp_path / "tp1.jsonl")
    evals = [(x["eval_loss"], y["eval_loss"]) for x, y in zip(a, b) if "eval_loss" in y]
    assert len(evals) == 2 and all("eval_loss" in x for x, y in zip(a, b) if "eval_loss" in y)
    assert all(abs(x - y) / y < 1e-4 for x, y in evals)
    assert all(abs(x["loss"] - y["loss"]) / y["loss"] < 1e-4 for x, y in zip(a, b))
