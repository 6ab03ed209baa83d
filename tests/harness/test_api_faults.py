"""The API backends under faults, against local wire-protocol servers: usage counted from every reply as it
arrives (failed rounds too), the budget checked before every call, fatal errors (401, 404, no key) that stop
the run at once without gates, malformed replies retried then failing cleanly, and Retry-After capped by the
round's deadline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from forge_toy import fake_gate, make_repo, make_task, toy_spec, write_spec_file, write_toml_spec
from typer.testing import CliRunner
from wire_servers import (Script, anthropic_error, anthropic_message, anthropic_tool_use, malformed, openai_error,
                          openai_reply, openai_tool_call, retry_after, serve)

from harness.agents import AgentUnavailable, get_backend
from harness.ledger import Ledger
from harness.loop import ForgeLoop

KEY = "sk-ant-api03-PLANTED-faults-0123456789abcdefghij"
LIST = {"path": "."}


def _loop(tmp_path: Path, url: str, *, service: str = "anthropic", budgets: dict | None = None, timeout_s: float = 60,
          retries: int = 2) -> tuple:
    eng = make_repo(tmp_path / "ws")
    calls: list[str] = []

    def gate(g, engine_dir, spec, out_dir):
        calls.append(g.name)
        return fake_gate(g, engine_dir, spec, out_dir)

    spec = toy_spec(eng, stages=("m1",), budgets=budgets or {}, agent={
        "backend": service, "model": "test-model", "timeout_s": timeout_s,
        "options": {"base_url": url if service == "anthropic" else url + "/v1", "retries": retries,
                    "retry_base_s": 0.01, "price_in_per_mtok": 1.0, "price_out_per_mtok": 10.0}})
    state = tmp_path / "s"
    out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state, gate_fn=gate).run()
    return out, Ledger(state / "ledger.jsonl"), calls, state


def _no_key_on_disk(*roots: Path) -> None:
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                assert KEY.encode() not in f.read_bytes(), f


@pytest.mark.parametrize("fault", ["malformed", "529"])
def test_usage_of_paid_turns_survives_a_failing_round(fault: str, tmp_path: Path, monkeypatch) -> None:
    """Two paid turns, then a fault that outlasts the retries: the round stops the run (resume later) and the
    ledger still has the 3000 + 300 tokens served."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    bad = malformed() if fault == "malformed" else anthropic_error(529)
    script = Script([anthropic_tool_use("t1", "list_dir", LIST, (1000, 100)),
                     anthropic_tool_use("t2", "list_dir", LIST, (2000, 200)), bad, bad, bad])
    with serve(script, "/v1/messages") as url:
        out, ledger, gates, _ = _loop(tmp_path, url)
    assert out.status == "agent_unavailable" and ("malformed reply" in out.message or "529" in out.message)
    (rec,) = ledger.rounds()
    assert (rec.verdict, rec.counted, rec.tokens_in, rec.tokens_out) == ("agent_unavailable", False, 3000, 300)
    assert rec.cost_usd == pytest.approx((3000 * 1 + 300 * 10) / 1e6) and not gates and len(script.requests) == 5


@pytest.mark.parametrize("service", ["anthropic", "openai"])
def test_a_malformed_reply_is_retried(service: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY" if service == "anthropic" else "OPENAI_API_KEY", KEY)
    wt = make_repo(tmp_path / "wt").parents[1]
    done = (anthropic_message([{"type": "text", "text": "ok"}], "end_turn", (7, 3)) if service == "anthropic"
            else openai_reply("ok", None, (7, 3)))
    script = Script([malformed(), malformed(b"[]"), done])
    with serve(script, "/v1/messages" if service == "anthropic" else "/chat/completions") as url:
        task = make_task(tmp_path, wt)
        res = get_backend(service, {"base_url": url if service == "anthropic" else url + "/v1",
                                    "retry_base_s": 0.01}, "test-model").run(task)
    assert res.error is None and res.summary == "ok" and (task.meter.tokens_in, task.meter.tokens_out) == (7, 3)
    assert (tmp_path / "logs/transcript.jsonl").read_text().count('"error": "MalformedReply"') == 2


def test_the_budget_is_checked_before_every_call(tmp_path: Path, monkeypatch) -> None:
    """5000 tokens: the first turn spends 4100, the second spends 1000 more and reaches it; no third call is
    made, the round is `error`, the run stops on its budget with the exact spend."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    script = Script([anthropic_tool_use("t1", "list_dir", LIST, (4000, 100)),
                     anthropic_tool_use("t2", "list_dir", LIST, (900, 100)),
                     anthropic_tool_use("t3", "list_dir", LIST, (9000, 100))])
    with serve(script, "/v1/messages") as url:
        out, ledger, gates, _ = _loop(tmp_path, url, budgets={"tokens": 5000})
    assert len(script.requests) == 2 and not gates
    (rec,) = ledger.rounds()
    assert rec.verdict == "error" and "token budget reached" in rec.agent_error and (rec.tokens_in, rec.tokens_out) == (4900, 200)
    assert out.status == "budget" and out.message == "token budget spent (5100 of 5000)"


def test_retry_after_never_outlives_the_round(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    script = Script([anthropic_tool_use("t1", "list_dir", LIST, (10, 1)), retry_after(anthropic_error(529), 6)])
    t0 = time.monotonic()
    with serve(script, "/v1/messages") as url:
        out, ledger, gates, _ = _loop(tmp_path, url, budgets={"rounds_per_stage": 1}, timeout_s=2)
    assert time.monotonic() - t0 < 5                     # never waited the 6 s
    (rec,) = ledger.rounds()
    assert rec.verdict == "error" and rec.agent_error.startswith("timeout: the service asked for a 6 s wait")
    assert (rec.tokens_in, rec.tokens_out) == (10, 1) and gates == ["m1_forward"]
    assert "the gates did not pass either" in rec.note


@pytest.mark.parametrize("status", [401, 403, 404])
def test_fatal_errors_stop_the_run_at_once(status: int, tmp_path: Path, monkeypatch) -> None:
    """A 401 that echoes the key, a 403, an unknown model: one round, not counted, no gates, the run stops
    with agent_failed; the key is nowhere on disk."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    script = Script([anthropic_error(status, f"invalid x-api-key: {KEY}"), anthropic_error(status)])
    with serve(script, "/v1/messages") as url:
        out, ledger, gates, state = _loop(tmp_path, url)
    assert out.status == "agent_failed" and str(status) in out.message and KEY not in out.message
    (rec,) = ledger.rounds()
    assert (rec.verdict, rec.counted) == ("agent_failed", False) and not gates and len(script.requests) == 1
    _no_key_on_disk(state)


def test_fatal_error_exit_code_and_message(tmp_path: Path, monkeypatch) -> None:
    """Through the CLI: exit 5 and a message naming the cause (never "passed", never the key)."""
    from harness.cli import app

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    eng = make_repo(tmp_path / "ws")
    script = Script([openai_error(401)])
    with serve(script, "/chat/completions") as url:
        spec = toy_spec(eng, stages=("m1",), agent={"backend": "openai", "model": "gpt-test",
                                                    "options": {"base_url": url + "/v1"}})
        r = CliRunner().invoke(app, ["forge", "--spec", str(write_toml_spec(tmp_path / "s.toml", spec)),
                                     "--state-dir", str(tmp_path / "state")])
    assert r.exit_code == 5, r.output
    assert "the service refused the key (HTTP 401)" in r.output and "passed" not in r.output and KEY not in r.output


def test_persistent_malformed_replies_fail_cleanly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    wt = make_repo(tmp_path / "wt").parents[1]
    script = Script([malformed(b"not json")] * 3)
    with serve(script, "/chat/completions") as url:
        with pytest.raises(AgentUnavailable, match="malformed reply"):
            get_backend("openai", {"base_url": url + "/v1", "retries": 2, "retry_base_s": 0.01},
                        "test-model").run(make_task(tmp_path, wt))
    assert len(script.requests) == 3


def test_openai_usage_counts_per_reply(tmp_path: Path, monkeypatch) -> None:
    """The meter moves with each reply (what inflight.json saves for a kill -9), not at the end."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    wt = make_repo(tmp_path / "wt").parents[1]
    seen: list[int] = []
    script = Script([openai_tool_call("c1", "list_dir", LIST, (100, 10)), openai_tool_call("c2", "list_dir", LIST, (200, 20)),
                     openai_reply("done", None, (300, 30))])
    with serve(script, "/chat/completions") as url:
        task = make_task(tmp_path, wt)
        task.meter.on_change = lambda m: seen.append(m.tokens_in + m.tokens_out)
        get_backend("openai", {"base_url": url + "/v1"}, "test-model").run(task)
    assert seen == [110, 330, 660]
