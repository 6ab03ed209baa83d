"""`train` on a failing rank: the rank's own one-line error is the last thing said (with where the full log is),
torchrun's launcher traceback goes to that log only."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from harness.cli import app
from harness.rank_errors import failing_rank_line

FAILING = '''
import os, sys, time
rank = int(os.environ.get("RANK", 0))
print(f"[STEP 1] rank {rank} loss 10.0", flush=True)
if rank == 1:
    print("error (rank 1): --data /nope: no such file [bold]", file=sys.stderr, flush=True)
    sys.exit(1)
time.sleep(5)
'''
REPORT = ["E1203 api.py:1002] failed (exitcode: 1) local_rank: 1 (pid: 930) of binary: python3", "Traceback (most recent call last):",
          "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "Root Cause (first observed failure):",
          "[0]:", "  time      : 2026-12-03_07:20:17", "  host      : localhost", "  rank      : 1 (local_rank: 1)"]


def test_the_root_cause_ranks_line_is_picked() -> None:
    lines = ["error (rank 0): a later complaint", "error (rank 1): the first failure", *REPORT]
    assert failing_rank_line(lines) == "error (rank 1): the first failure"
    crash = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: shapes (2, 3) and (4,)", *REPORT]
    assert failing_rank_line(crash) == "ValueError: shapes (2, 3) and (4,)"
    assert failing_rank_line(REPORT) is None  # torchrun's own ChildFailedError is never the rank's error


def test_an_error_line_ending_in_a_colon_carries_its_detail() -> None:
    """The engines' config errors say `invalid engine config:` and name each field on an indented line below."""
    lines = ["error (rank 1): invalid engine config:",
             "  train.global_batch_size (4) is not a multiple of train.micro_batch_size (3)",
             "error (rank 0): invalid engine config:", "  train.seq_length (4096) exceeds the model's max_seq_length",
             "  model.x: bad", "[STEP 1] not a detail", *REPORT]
    assert failing_rank_line(lines) == ("error (rank 1): invalid engine config: train.global_batch_size (4) is not a "
                                        "multiple of train.micro_batch_size (3)")
    assert failing_rank_line(lines[2:]) == ("error (rank 0): invalid engine config: train.seq_length (4096) exceeds "
                                            "the model's max_seq_length; model.x: bad")


def test_a_ranks_usage_error_is_its_line() -> None:
    """An unknown option fails in the ranks as click/typer's usage error, a rich panel or a plain `Error:` line."""
    panel = ["Usage: eng pretrain [OPTIONS]", "Try 'eng pretrain --help' for help.", "╭─ Error ─────────╮",
             "│ No such option: --bogus (Possible options: --log-file)   │", "╰─────────────────╯", *REPORT]
    assert failing_rank_line(panel) == "usage error: No such option: --bogus (Possible options: --log-file)"
    plain = ["Usage: eng pretrain [OPTIONS]", "Error: No such option: --bogus", *REPORT]
    assert failing_rank_line(plain) == "usage error: No such option: --bogus"


def test_train_says_the_failing_ranks_error_last(tmp_path: Path) -> None:
    pkg = tmp_path / "engine/src/fail_engine"
    pkg.mkdir(parents=True)
    (pkg / "__main__.py").write_text(FAILING)
    log = tmp_path / "console.log"
    r = CliRunner().invoke(app, ["train", "--engine", str(tmp_path / "engine"), "--nproc-per-node", "2",
                                 "--console-log", str(log)], terminal_width=200)
    assert r.exit_code == 1, r.output
    tail = [line for line in r.output.splitlines() if line.strip()][-2:]
    assert tail == ["train failed (exit 1): error (rank 1): --data /nope: no such file [bold]", f"full log: {log}"]
    assert "ChildFailedError" not in r.output and "ChildFailedError" in log.read_text()
    assert "[STEP 1] rank 0 loss 10.0" in r.output and "[STEP 1] rank 0 loss 10.0" in log.read_text()
