"""`agent-loop.sh case new`: writes a loadable case; rejects bad arguments with a clear message. In process,
through typer's CliRunner (agent-loop.sh only hands its arguments to this app); one test runs the script itself."""

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from gates.case import load_case
from harness.cli import app

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    r = CliRunner().invoke(app, list(args))
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def test_case_new_writes_a_case(tmp_path):
    r = run("case", "new", "--model", "tiny", "--steps", "4", "--world-size", "2", "--seed", "0", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    case = load_case(tmp_path)
    assert case.spec.steps == 4 and case.spec.world_size == 2
    assert case.batches["input_ids"].shape[:2] == (4, 2)
    assert (case.batches["labels"] == -100).any()
    assert case.spec.optimizer.lr == 1e-3  # the default


def test_case_new_sets_the_peak_lr(tmp_path):
    r = run("case", "new", "--model", "tiny", "--lr", "1e-4", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    opt = load_case(tmp_path).spec.optimizer
    assert opt.lr == 1e-4 and opt.min_lr == pytest.approx(1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--world-size", "0"], "world_size"),
        (["--steps", "0"], "steps"),
        (["--model", "no-such"], "neither a preset"),
        (["--dtype", "float16"], "dtype"),
        (["--seq-length", "5000"], "exceeds model.max_seq_length"),
        (["--lr", "0"], "optimizer.lr"),
    ],
)
def test_case_new_rejects_bad_arguments(tmp_path, args, message):
    r = run("case", "new", "--out", str(tmp_path / "c"), *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert not (tmp_path / "c").exists()


def test_unbuilt_verbs_never_pretend():
    r = subprocess.run(["bash", str(ROOT / "agent-loop.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for verb in ("forge", "gate", "inspect", "train", "bench", "case", "demo"):
        assert verb in r.stdout
