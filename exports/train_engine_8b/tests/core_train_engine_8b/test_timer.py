"""The one clock (core/timer.py) on its CPU path, with perf_counter replaced by a fake clock that each call advances
by a known amount: warm-up calls are not timed, each rep is, the median, minimum and spread are those of the reps,
interleaved rounds visit every function once per round, and bad arguments are refused by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from .core_testlib import engine_import

timer = engine_import("core.timer")


class FakeClock:
    """perf_counter in seconds; `call` advances it by the next of `durations_ms`."""

    def __init__(self, durations_ms: list[float]) -> None:
        self.now, self.durations, self.calls = 0.0, list(durations_ms), 0

    def perf_counter(self) -> float:
        return self.now

    def call(self) -> None:
        self.now += self.durations[self.calls] / 1e3
        self.calls += 1


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):
    def make(durations_ms: list[float]) -> FakeClock:
        fake = FakeClock(durations_ms)
        monkeypatch.setattr(timer, "time", SimpleNamespace(perf_counter=fake.perf_counter))
        return fake

    return make


def test_warmup_is_untimed_and_each_rep_is_timed_alone(clock) -> None:
    fake = clock([100.0, 100.0, 4.0, 1.0, 2.0, 3.0, 10.0])  # two warm-up calls, then five reps
    t = timer.time_calls(fake.call, device="cpu", reps=5, warmup=2)
    assert fake.calls == 7 and t.reps == 5
    assert t.times_ms == pytest.approx((4.0, 1.0, 2.0, 3.0, 10.0))
    assert (t.median_ms, t.min_ms) == pytest.approx((3.0, 1.0))
    assert t.spread == pytest.approx((10.0 - 1.0) / 3.0)
    assert (t.clock, t.l2_flushed) == ("perf_counter", False)


def test_an_even_count_takes_the_middle_mean_and_one_rep_has_no_spread(clock) -> None:
    assert timer.time_calls(clock([1.0, 2.0, 4.0, 8.0]).call, device="cpu", reps=4, warmup=0).median_ms == \
        pytest.approx(3.0)
    one = timer.time_calls(clock([5.0]).call, device="cpu", reps=1, warmup=0)
    assert (one.median_ms, one.spread) == pytest.approx((5.0, 0.0))


def test_interleaved_rounds_visit_every_function_once_per_round(clock) -> None:
    order: list[str] = []
    fake = clock([1.0] * 100)

    def fn(name: str):
        return lambda: (order.append(name), fake.call())

    out = timer.interleaved_ms({"a": fn("a"), "b": fn("b")}, rounds=3, device="cpu", reps=2, warmup=1)
    assert order == (["a"] * 3 + ["b"] * 3) * 3  # per round: a's warm-up and reps, then b's
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3}
    assert all(ms == pytest.approx(1.0) for v in out.values() for ms in v)


@pytest.mark.parametrize("kwargs, field", [
    ({"reps": 0}, "reps"), ({"warmup": -1}, "warmup"), ({"l2_flush_bytes": -1}, "l2_flush_bytes"),
    ({"l2_flush_bytes": 1024}, "l2_flush_bytes"),  # flushing an L2 needs a CUDA device
    ({"device": "meta"}, "device")])
def test_bad_arguments_are_refused_by_name(kwargs: dict, field: str) -> None:
    calls: list[int] = []
    with pytest.raises(ValueError, match=f"^{field}: "):
        timer.time_calls(lambda: calls.append(1), **({"device": "cpu"} | kwargs))
    assert calls == []  # refused before anything runs


def test_interleaved_needs_a_round() -> None:
    with pytest.raises(ValueError, match="^rounds: "):
        timer.interleaved_ms({"f": lambda: None}, rounds=0, device="cpu")
