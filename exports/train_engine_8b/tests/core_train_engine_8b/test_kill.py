"""A small kill -9 campaign: `pretrain --save-interval 1` SIGKILLed at random moments while it saves (a
save's temporary folder or pending pointer is on disk), resumed each time, and finally run to the end: the
result equals an uninterrupted run bit for bit (dump-state tensors, and each step's last log line). The same with
two ZeRO-1 ranks under torchrun, the whole process group killed while the ranks write their shards."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .core_testlib import engine_env, engine_import, read_log
from .engine_fixture import ENGINE, MODEL, PACKAGE, SMALL_RUN

VOCAB = engine_import("model_config").load(MODEL).vocab_size

STEPS, KILLS = 10, 3
SAVING = (".tmp-step_", ".latest.tmp", ".old-")  # on disk only while a save is under way


def _batches(path: Path) -> Path:
    ids = torch.randint(0, VOCAB, (STEPS, 2, 32), generator=torch.Generator().manual_seed(11))
    save_file({"input_ids": ids, "labels": torch.roll(ids, -1, dims=2)}, str(path))
    return path


def _args(batches: Path, save: Path, log: Path) -> list[str]:
    return ["pretrain", *SMALL_RUN, "--global-batch-size", "2", "--micro-batch-size", "2", "--num-steps", str(STEPS),
            "--lr-schedule", "cosine", "--token-batches", str(batches), "--save-dir", str(save), "--save-interval", "1",
            "--log-file", str(log)]


def _engine(*args) -> list[str]:
    return [sys.executable, "-m", PACKAGE, *map(str, args)]


def _kill_during_a_save(cmd: list[str], save: Path, rng: random.Random) -> list[str] | None:
    """Start `cmd`; at a random save (after a random delay into it) SIGKILL it; returns the save dir's entries
    just after the kill (None if the run finished first)."""
    stale = set(os.listdir(save)) if save.is_dir() else set()  # a killed run's leftovers: the new one removes them
    proc = subprocess.Popen(cmd, env=engine_env(), cwd=ENGINE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    skip = rng.randrange(3)  # saves to let pass
    seen_saving = False
    try:
        while proc.poll() is None:
            saving = save.is_dir() and any(n.startswith(SAVING) and n not in stale for n in os.listdir(save))
            if saving and not seen_saving:
                if skip == 0:
                    time.sleep(rng.uniform(0, 0.03))  # into the save (a small one takes ~10-50 ms)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=30)
                    return sorted(os.listdir(save))
                skip -= 1
            seen_saving = saving
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    return None


def _dump(cli, save: Path, out: Path) -> dict[str, torch.Tensor]:
    res = cli(["dump-state", "--checkpoint", save, "--out", out])
    assert res.exit_code == 0, res.output + res.stderr
    return load_file(str(out / "tensors.safetensors"))


@pytest.mark.slow
def test_kills_during_saves_then_resume_equals_the_uninterrupted_run(cli, tmp_path):
    rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,))))
    batches = _batches(tmp_path / "batches.safetensors")
    straight = cli(_args(batches, tmp_path / "straight", tmp_path / "straight.jsonl"))  # in this process: one thread too
    assert straight.exit_code == 0, straight.output + straight.stderr

    save, log = tmp_path / "killed", tmp_path / "killed.jsonl"
    kills = []  # the save dir as each kill left it
    for _ in range(KILLS):
        extra = ["--resume"] if save.exists() else []
        kills.append(_kill_during_a_save(_engine(*_args(batches, save, log), *extra), save, rng))
    assert any(kills), "no save was ever caught in progress"
    final = subprocess.run(_engine(*_args(batches, save, log), "--resume"), env=engine_env(), cwd=ENGINE,
                           capture_output=True, text=True, timeout=240)
    assert final.returncode == 0, final.stderr[-3000:]

    want, got = _dump(cli, tmp_path / "straight", tmp_path / "d1"), _dump(cli, save, tmp_path / "d2")
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want), kills
    a, b = read_log(tmp_path / "straight.jsonl"), read_log(log)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr", "valid_tokens"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert not [n for n in os.listdir(save) if n.startswith(".")]


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", PACKAGE,
            *map(str, args)]


def _kill_group_during_a_save(cmd: list[str], save: Path, rng: random.Random) -> list[str] | None:
    """As _kill_during_a_save, for torchrun and its ranks: SIGKILL to the whole process group."""
    stale = set(os.listdir(save)) if save.is_dir() else set()
    proc = subprocess.Popen(cmd, env=engine_env(), cwd=ENGINE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        while proc.poll() is None:
            if save.is_dir() and any(n.startswith(SAVING) and n not in stale for n in os.listdir(save)):
                time.sleep(rng.uniform(0, 0.05))  # into the save: the ranks write their shards, rank 0 renames
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return sorted(os.listdir(save))
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    return None


@pytest.mark.slow
def test_kills_of_two_zero1_ranks_during_saves_then_resume_equals_the_uninterrupted_run(cli, tmp_path):
    rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,))))
    batches = _batches(tmp_path / "batches.safetensors")
    base = ["--global-batch-size", "2", "--micro-batch-size", "1", "--bucket-mb", "0.05", "--zero1"]
    args = lambda name: [*_args(batches, tmp_path / name, tmp_path / f"{name}.jsonl"), *base]  # noqa: E731
    straight = subprocess.run(_torchrun(*args("straight")), env=engine_env(), cwd=ENGINE, capture_output=True, text=True,
                              timeout=240)
    assert straight.returncode == 0, straight.stderr[-3000:]
    save = tmp_path / "killed"
    kills = [_kill_group_during_a_save(_torchrun(*args("killed"), *(["--resume"] if save.exists() else [])), save, rng)
             for _ in range(2)]
    assert any(kills), "no save was ever caught in progress"
    final = subprocess.run(_torchrun(*args("killed"), "--resume"), env=engine_env(), cwd=ENGINE, capture_output=True,
                           text=True, timeout=240)
    assert final.returncode == 0, final.stderr[-3000:]
    want, got = _dump(cli, tmp_path / "straight", tmp_path / "d1"), _dump(cli, save, tmp_path / "d2")
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want), kills
    a, b = read_log(tmp_path / "straight.jsonl"), read_log(tmp_path / "killed.jsonl")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert not [n for n in os.listdir(save) if n.startswith(".")]
