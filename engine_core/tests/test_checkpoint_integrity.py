"""Checkpoint integrity and the save dir: each failure a trial found, with its real outcome (exit code, the
one-line message, files intact, bitwise resume). Tiny model on pre-batched tokens (`--token-batches`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .core_testlib import engine_env, engine_import, read_log
from .engine_fixture import ENGINE, MODEL, PACKAGE, SMALL_RUN

ckpt, ckpt_dir = engine_import("core", "checkpoint", "ckpt_dir")
VOCAB = engine_import("model_config").load(MODEL).vocab_size

ROWS, SEQ = 2, 32
RUN = [*SMALL_RUN, "--global-batch-size", str(ROWS), "--micro-batch-size", str(ROWS)]


def token_batches(path: Path, steps: int, nan_steps: tuple[int, ...] = ()) -> Path:
    """Random ids, next-token labels; the steps in `nan_steps` (1-based) ignore every label, so their loss is
    0 / 0 (a non-finite loss and gradient, as a real divergence gives)."""
    ids = torch.randint(0, VOCAB, (steps, ROWS, SEQ), generator=torch.Generator().manual_seed(7))
    labels = torch.roll(ids, -1, dims=2)
    for step in nan_steps:
        labels[step - 1] = -100
    save_file({"input_ids": ids, "labels": labels}, str(path))
    return path


def pretrain(cli, save: Path, batches: Path, steps: int, *extra):
    return cli(["pretrain", *RUN, "--num-steps", steps, "--token-batches", batches, "--save-dir", save, *extra])


def snapshot(save: Path) -> dict[str, bytes]:
    return {str(p.relative_to(save)): p.read_bytes() for p in sorted(save.rglob("*")) if p.is_file()}


def one_error_line(res) -> str:
    """The run failed with exactly one `error:` line and no traceback; returns that line."""
    assert res.exit_code == 1, (res.exit_code, res.output, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A save dir with checkpoints at steps 1 and 2 (of a 4-step run stopped after 2), and its batches."""
    from typer.testing import CliRunner

    app = engine_import("cli").app
    root = tmp_path_factory.mktemp("integrity")
    batches = token_batches(root / "batches.safetensors", 4)
    res = CliRunner().invoke(app, ["pretrain", *RUN, "--num-steps", "4", "--token-batches", str(batches), "--save-dir",
                                   str(root / "save"), "--save-interval", "1", "--exit-after-steps", "2"])
    assert res.exit_code == 0, res.output + res.stderr
    return root / "save", batches


@pytest.fixture
def save(trained, tmp_path) -> Path:
    shutil.copytree(trained[0], tmp_path / "save")
    return tmp_path / "save"


@pytest.fixture
def batches(trained) -> Path:
    return trained[1]


def resume_fails(cli, save: Path, batches: Path, *needles: str) -> str:
    before = snapshot(save)
    line = one_error_line(pretrain(cli, save, batches, 4, "--resume"))
    for needle in needles:
        assert needle in line, (needle, line)
    assert snapshot(save) == before, "a refused resume changed the save dir"
    return line


# -- the log --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_kill_right_after_resuming_leaves_the_log_intact(save, batches, tmp_path):
    log = tmp_path / "log.jsonl"  # as a run killed during step 3 left it
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)) + '{"step": 3, "lo')
    before = log.read_bytes()
    cmd = [sys.executable, "-m", PACKAGE, "pretrain", *RUN, "--num-steps", "4", "--token-batches",
           str(batches), "--save-dir", str(save), "--resume", "--log-file", str(log)]
    proc = subprocess.Popen(cmd, env=engine_env(PYTHONUNBUFFERED="1"), cwd=ENGINE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "resumed from" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert log.read_bytes().startswith(before)  # appended to (at most), never truncated


# -- checksums ------------------------------------------------------------------------------------------

SHARD = "optimizer/__0_0.distcp"  # the one rank's DCP shard file: masters, moments, step count


def overwrite_tensor(step_dir: Path, name: str, payload: bytes) -> None:
    """Write `payload` (repeated) over the middle of tensor `name`'s bytes in the shard file (as state.json's
    checksums place them): same size, the rest untouched."""
    segments = json.loads((step_dir / "state.json").read_text())["checksums"]["files"][SHARD]["segments"]
    start, end = next((a, b) for n, a, b, _ in segments if n == name)
    start, end = start + (end - start) // 3, end - (end - start) // 3
    with (step_dir / SHARD).open("r+b") as f:
        f.seek(start)
        f.write((payload * (end - start))[: end - start])


@pytest.mark.parametrize("tensor,payload", [
    ("master.model.layers.1.mlp.down_proj.weight", b"\x5a\xa5\x13"),  # garbage
    ("exp_avg_sq.model.norm.weight", struct.pack("<f", float("nan"))),  # NaN
])
def test_changed_tensor_bytes_are_refused_naming_file_and_tensor(cli, save, batches, tmp_path, tensor, payload):
    overwrite_tensor(save / "step_00000002", tensor, payload)
    resume_fails(cli, save, batches, f"step_00000002/{SHARD}", tensor, "checksum")
    for command in (["export-hf", "--out", tmp_path / "hf"], ["dump-state", "--out", tmp_path / "dump"]):
        line = one_error_line(cli([command[0], "--checkpoint", save, *command[1:]]))
        assert tensor in line and not (tmp_path / "hf").exists()


# -- non-finite steps -----------------------------------------------------------------------------------

def test_a_nonfinite_step_stops_the_run_before_any_save(cli, tmp_path):
    batches = token_batches(tmp_path / "b.safetensors", 5, nan_steps=(3,))
    save, log = tmp_path / "save", tmp_path / "log.jsonl"
    line = one_error_line(pretrain(cli, save, batches, 5, "--save-interval", "1", "--log-file", log))
    assert "step 3: non-finite loss (nan)" in line and "--nan-policy" in line
    assert ckpt.find_latest(save).name == "step_00000002" and not (save / "step_00000003").exists()
    assert [r["step"] for r in read_log(log)] == [1, 2, 3] and read_log(log)[2]["loss"] != read_log(log)[2]["loss"]
    # saving only at the end: the run stops with no checkpoint at all
    line = one_error_line(pretrain(cli, tmp_path / "end", batches, 5))
    assert "step 3" in line and not ckpt_dir.step_dirs(tmp_path / "end") and not (tmp_path / "end" / "latest").exists()


def _weights_and_moments(step_dir: Path) -> dict[str, torch.Tensor]:
    loaded = ckpt.load(step_dir)
    return {**{f"weight.{k}": v for k, v in loaded.master.items()}, **loaded.optim}


def test_a_skipped_step_updates_nothing_and_resumes_bitwise(cli, tmp_path):
    batches = token_batches(tmp_path / "b.safetensors", 6, nan_steps=(3,))
    skip = ["--nan-policy", "skip", "--max-skipped-steps", "1", "--lr-schedule", "cosine"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    res = pretrain(cli, straight, batches, 6, *skip, "--save-interval", "1", "--log-file", tmp_path / "straight.jsonl")
    assert res.exit_code == 0, res.output + res.stderr
    assert "skipped" in res.output
    two, three = _weights_and_moments(straight / "step_00000002"), _weights_and_moments(straight / "step_00000003")
    assert all(torch.equal(two[k], three[k]) for k in two)  # step 3 changed no weight and no moment
    state = json.loads((straight / "step_00000003" / "state.json").read_text())
    assert state["optimizer_steps"] == 2 and state["skipped_steps"] == 1
    four = _weights_and_moments(straight / "step_00000004")
    assert not all(torch.equal(three[k], four[k]) for k in three)  # and training went on
    log = read_log(tmp_path / "straight.jsonl")
    assert [r.get("skipped", False) for r in log] == [False, False, True, False, False, False]
    assert log[3]["lr"] == log[2]["lr"]  # the schedule counts optimizer steps: step 4 takes the skipped one's LR

    for extra in (["--exit-after-steps", "3"], ["--resume"]):
        res = pretrain(cli, split, batches, 6, *skip, "--log-file", tmp_path / "split.jsonl", *extra)
        assert res.exit_code == 0, res.output + res.stderr
    a, b = _weights_and_moments(straight / "step_00000006"), _weights_and_moments(split / "step_00000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("loss", "grad_norm", "lr"):
        got, want = [r[key] for r in read_log(tmp_path / "split.jsonl")], [r[key] for r in log]
        assert [str(x) for x in got] == [str(x) for x in want], key  # (NaN != NaN: compared as text)


def test_more_skipped_steps_than_allowed_stop_the_run(cli, tmp_path):
    batches = token_batches(tmp_path / "b.safetensors", 6, nan_steps=(2, 4))
    save = tmp_path / "save"
    line = one_error_line(pretrain(cli, save, batches, 6, "--nan-policy", "skip", "--max-skipped-steps", "1",
                                   "--save-interval", "1"))
    assert "step 4" in line and "skipped step number 2" in line and "--max-skipped-steps 1" in line
    assert ckpt.find_latest(save).name == "step_00000003"


def test_cuda_graph_and_skipping_are_refused_together(cli):
    res = cli(["pretrain", *RUN, "--num-steps", "2", "--nan-policy", "skip", "--cuda-graph"])
    assert res.exit_code == 1 and "a captured step cannot skip itself" in res.stderr


# -- latest and step folders ----------------------------------------------------------------------------

def test_missing_latest_names_the_newest_valid_step(cli, save, batches):
    (save / "latest").unlink()
    line = resume_fails(cli, save, batches, "no `latest`", "step_00000002")
    assert "echo step_00000002" in line
    one_error_line(pretrain(cli, save, batches, 4))  # without --resume: no silent restart over step folders
    shard = save / "step_00000002" / SHARD
    shard.write_bytes(shard.read_bytes()[:100])  # step 2 is no longer valid: step 1 is the newest valid one
    resume_fails(cli, save, batches, "step_00000001")


def test_state_step_must_match_its_folder(cli, save, batches):
    state_file = save / "step_00000002" / "state.json"
    state_file.write_text(state_file.read_text().replace('"step": 2,', '"step": 1,'))
    resume_fails(cli, save, batches, "state.json says step 1", "step_00000002")


@pytest.mark.parametrize("content,says", [
    (b"../elsewhere/step_00000002", "not a folder inside"), (b"/tmp", "not a folder inside"), (b"", "not a folder inside"),
    (b"config.toml", "not a folder in"), (b"\xff\xfestep_00000002", "not valid UTF-8"), (b"outside", "leads outside"),
])
def test_latest_must_name_a_folder_inside_the_save_dir(cli, save, batches, tmp_path, content, says):
    (tmp_path / "elsewhere").mkdir()
    shutil.copytree(save / "step_00000002", tmp_path / "elsewhere" / "step_00000002")
    (save / "outside").symlink_to(tmp_path / "elsewhere" / "step_00000002")  # a folder name that leads elsewhere
    (save / "latest").write_bytes(content)
    resume_fails(cli, save, batches, str(save / "latest"), says)


def test_stale_temporaries_are_removed_and_a_killed_pointer_finished(cli, save, batches):
    (save / ".tmp-step_00000003-x1").mkdir()
    (save / ".tmp-step_00000003-x1" / "model.safetensors").write_bytes(b"half")
    (save / ".old-step_00000002-x2").mkdir()
    (save / "latest").write_text("step_00000001\n")  # killed between step 2's rename and its pointer
    (save / ".latest.tmp").write_text("step_00000002\n")
    res = pretrain(cli, save, batches, 3, "--resume")
    assert res.exit_code == 0, res.output + res.stderr
    assert "finished a save that was killed" in res.output and "removed 2 temporary entries" in res.output
    assert "resumed from" in res.output and "step_00000002" in res.output
    assert sorted(p.name for p in save.iterdir() if p.name.startswith(".")) == []
    assert ckpt.find_latest(save).name == "step_00000003"


# -- the save dir and a failing save --------------------------------------------------------------------

def test_save_dir_that_is_a_file(cli, batches, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    line = one_error_line(pretrain(cli, tmp_path / "file", batches, 2))
    assert "is a file" in line and (tmp_path / "file").read_text() == "not a directory"
    one_error_line(pretrain(cli, tmp_path / "file" / "sub", batches, 2))


@pytest.mark.parametrize("failure", [
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),  # what safetensors raises
    OSError(errno.ENOSPC, "No space left on device", "model.safetensors"),
    PermissionError(errno.EACCES, "Permission denied", "model.safetensors"),
])
def test_a_failing_save_is_one_line_and_loses_nothing(cli, save, batches, monkeypatch, failure):
    real = ckpt.save_file

    def save_file(tensors, path, metadata=None):
        if "step_00000003" in path:
            raise failure
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    before = snapshot(save)
    line = one_error_line(pretrain(cli, save, batches, 4, "--resume", "--save-interval", "1"))
    assert "cannot write checkpoint step_00000003" in line and "step_00000002" in line
    after = snapshot(save)
    assert {k: v for k, v in after.items() if k != "config.toml"} == {k: v for k, v in before.items() if k != "config.toml"}
    assert ckpt.load(save).step == 2 and not [p for p in save.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk_keeps_the_last_good_checkpoint(batches, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    size = 2 * sum(f.stat().st_size for f in (Path(batches).parent / "save" / "step_00000001").rglob("*") if f.is_file())
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 4}", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("mount is not permitted here")
    try:
        cmd = [sys.executable, "-m", PACKAGE, "pretrain", *RUN, "--num-steps", "4", "--token-batches",
               str(batches), "--save-dir", str(disk / "save"), "--save-interval", "1"]
        proc = subprocess.run(cmd, env=engine_env(), cwd=ENGINE, capture_output=True, text=True, timeout=240)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "No space left on device" in errors[0] and "step_00000001" in errors[0]
        assert ckpt.load(disk / "save").step == 1
        assert not [p for p in (disk / "save").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(disk)])
