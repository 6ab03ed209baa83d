"""The gate's clock on a running `pretrain`'s log (gates/line_clock.py): real lines written by a thread, stamped
as they appear; and the window rule on scripted arrivals."""

from __future__ import annotations

import threading
import time

import pytest

from gates.line_clock import LineClock, line_window


def write_lines(path, steps, pause_s, start=1, extra=()):
    with open(path, "a") as f:
        for line in extra:
            f.write(line)
            f.flush()
        for t in range(start, start + steps):
            time.sleep(pause_s)
            f.write(f'{{"step": {t}, "loss": 1.0}}\n')
            f.flush()


def test_each_line_is_stamped_when_it_appears(tmp_path):
    """Ten lines 50 ms apart: ten stamps in order, about 50 ms apart; a line cut mid-write counts once whole;
    lines that are not a step's JSON and a repeated step (a resumed run) are not stamped again."""
    log = tmp_path / "run.jsonl"
    writer = threading.Thread(target=write_lines, args=(log, 10, 0.05),
                              kwargs={"extra": ("not json\n", '{"note": "no step"}\n')})
    with LineClock(log) as clock:
        writer.start()
        writer.join()
        with open(log, "a") as f:
            f.write('{"step": 11, "lo')
            f.flush()
            time.sleep(0.05)
            assert 11 not in clock.stamps  # half a line is no line yet
            f.write('ss": 1.0}\n{"step": 3, "loss": 2.0}\n')
    stamps = clock.stamps
    assert sorted(stamps) == list(range(1, 12))
    gaps = [stamps[t] - stamps[t - 1] for t in range(2, 11)]
    assert all(g > 0.03 for g in gaps) and sum(gaps) == pytest.approx(0.45, abs=0.2)
    assert stamps[11] - stamps[10] > 0.03  # its second half came 50 ms after the first


def test_lines_already_in_the_log_are_not_stamped(tmp_path):
    log = tmp_path / "run.jsonl"
    write_lines(log, 3, 0.0)
    with LineClock(log) as clock:
        write_lines(log, 2, 0.01, start=4)
    assert sorted(clock.stamps) == [4, 5]


def test_a_log_that_never_appears_stamps_nothing(tmp_path):
    with LineClock(tmp_path / "missing.jsonl") as clock:
        time.sleep(0.01)
    assert clock.stamps == {}


@pytest.mark.parametrize("stamps, want", [
    ({t: 0.5 * t for t in range(1, 11)}, 2.5),                                  # steady: lines 5..10, 5 gaps of 0.5
    ({t: 0.5 * min(t, 8) + 1e-3 * max(0, t - 8) for t in range(1, 11)}, 2.5),   # 8-10 held back, then at once
    ({t: 2.0 * ((t - 1) // 3) for t in range(1, 11)}, 4.0),                      # written 3 lines at a time: the span
    ({t: 1.0 for t in range(1, 11)}, 0.0),                                      # all at once: nothing to time
])
def test_the_window_is_the_span_never_shorter_than_the_median_pace(stamps, want):
    window, numbers = line_window(stamps, 5, 10)
    assert window == pytest.approx(want) and numbers["lines_out_of_order"] == 0


def test_a_missing_line_gives_no_window():
    window, numbers = line_window({t: float(t) for t in range(1, 11) if t != 7}, 5, 10)
    assert window is None and numbers["lines_missing"] == "1 of steps 5..10, first 7"
