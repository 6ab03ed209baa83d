"""The training contract's log reader (gates/train_contract.py read_log): the last line of a step wins, a line
cut by a kill is skipped, and every other problem is a LogError naming it."""

from __future__ import annotations

import json
import random

import pytest

from gates.train_contract import LogError, read_log


def line(step: int, loss: float, **extra) -> str:
    rec = {"step": step, "loss": loss, "grad_norm": 1.5 * loss, "lr": 1e-3 / step, "valid_tokens": 100 + step} | extra
    return json.dumps(rec)


def test_series_in_step_order_last_line_wins_and_cut_lines_skipped(tmp_path):
    rng = random.Random()
    losses = [rng.uniform(2, 9) for _ in range(5)]
    lines = [line(1, losses[0]), line(2, losses[1]), line(3, losses[2] + 100),
             '{"step": 4, "loss": 7.1, "grad_n',  # cut by a kill; the resumed run logs step 3 again
             line(3, losses[2]), line(4, losses[3]), line(5, losses[4])]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # the last write cut too
    got = read_log(path, 1, 5)
    assert got["losses"].tolist() == pytest.approx(losses, rel=1e-15)
    assert got["grad_norms"].tolist() == pytest.approx([1.5 * x for x in losses], rel=1e-15)
    assert got["valid_tokens"].tolist() == [101, 102, 103, 104, 105]
    assert read_log(path, 2, 3)["lrs"].tolist() == pytest.approx([5e-4, 1e-3 / 3])


@pytest.mark.parametrize("body, why", [
    (None, "no log at"),
    (line(1, 3.0), "no line for step 2"),
    (line(1, 3.0) + "\n" + json.dumps({"loss": 3.0}), "line 2 is not a JSON object with an integer `step`"),
    (line(1, 3.0) + "\n" + line(2, float("nan")), "step 2: `loss` is nan"),
    (line(1, 3.0) + "\n" + line(2, 3.0, lr="0.1"), "step 2: `lr` is '0.1', not a number"),
    (line(1, 3.0) + "\n" + line(2, 3.0, grad_norm=True), "`grad_norm` is True"),
])
def test_problems_are_named(tmp_path, body, why):
    path = tmp_path / "log.jsonl"
    if body is not None:
        path.write_text(body + "\n")
    with pytest.raises(LogError, match=why.replace("(", r"\(").replace("[", r"\[")):
        read_log(path, 1, 2)
