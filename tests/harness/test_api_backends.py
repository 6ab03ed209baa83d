"""The anthropic and openai backends against local servers speaking each wire protocol (Messages API
with tool_use blocks; Chat Completions with tool_calls): a scripted multi-turn tool-use conversation
that fixes the toy engine, with a 429 and a 5xx retried on the way; then the same inside the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from forge_toy import FIXED, MODEL_PY, fake_gate, make_repo, make_task, toy_spec, write_spec_file
from wire_servers import (Script, anthropic_error, anthropic_message, anthropic_tool_use, openai_error, openai_reply,
                          openai_tool_call, serve, slow)

from harness.agents import AgentUnavailable, get_backend
from harness.agents.base import AgentFatal
from harness.ledger import Ledger
from harness.loop import ForgeLoop

KEY = "sk-test-SECRET-KEY-0123456789abcdef"
MODEL_PATH = "exports/toy_engine/src/toy_engine/model.py"


def _conversation(tool, final, error) -> list:
    """list -> read -> (429) -> write the fix -> (503) -> run a check -> done."""
    return [
        tool("c1", "list_dir", {"path": "exports/toy_engine/src/toy_engine"}),
        tool("c2", "read_file", {"path": MODEL_PATH}),
        error(429),
        tool("c3", "write_file", {"path": MODEL_PATH, "content": FIXED}),
        error(503),
        tool("c4", "run_command", {"command": "echo KEY=${ANTHROPIC_API_KEY:-none}${OPENAI_API_KEY:-none}; "
                                              "PYTHONPATH=exports/toy_engine/src python3 -c "
                                              "'from toy_engine.model import forward; print(forward([1.0]))'"}),
        tool("c5", "read_file", {"path": "../../etc/passwd"}),
        final,
    ]


@pytest.mark.parametrize("service", ["anthropic", "openai"])
def test_multi_turn_tool_use_with_retries(service: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY" if service == "anthropic" else "OPENAI_API_KEY", KEY)
    wt = make_repo(tmp_path / "wt").parents[1]
    if service == "anthropic":
        script = Script(_conversation(anthropic_tool_use,
                                      anthropic_message([{"type": "text", "text": "fixed forward"}], "end_turn", (300, 40)),
                                      anthropic_error))
        route = "/v1/messages"
    else:
        script = Script(_conversation(openai_tool_call, openai_reply("fixed forward", None, (300, 40)), openai_error))
        route = "/chat/completions"
    with serve(script, route) as url:
        base_url = url if service == "anthropic" else url + "/v1"
        backend = get_backend(service, {"base_url": base_url, "retry_base_s": 0.01, "retries": 3}, "test-model")
        task = make_task(tmp_path, wt)
        result = backend.run(task)

    assert result.error is None and result.summary == "fixed forward"
    assert (wt / MODEL_PATH).read_text() == FIXED
    assert result.turns == 6 and task.meter.tokens_in == 5 * 100 + 300 and task.meter.tokens_out == 5 * 20 + 40
    reqs = script.requests
    assert len(reqs) == 8                                        # 6 answered turns + the 429 and the 503, retried
    # the key goes to the service, and only there (anthropic 2.x sends it as a bearer token, 0.x as x-api-key)
    assert all(KEY in (r["headers"].get("x-api-key", "") + r["headers"].get("authorization", "")) for r in reqs)
    last = reqs[-1]["body"]
    assert last["model"] == "test-model" and {t.get("name") or t["function"]["name"] for t in last["tools"]} == {
        "read_file", "write_file", "list_dir", "run_command"}
    if service == "anthropic":
        results = [b for m in last["messages"] if m["role"] == "user" and isinstance(m["content"], list)
                   for b in m["content"] if b["type"] == "tool_result"]
        ids = [b["tool_use_id"] for b in results]
        outputs = [b["content"] for b in results]
    else:
        tool_msgs = [m for m in last["messages"] if m["role"] == "tool"]
        ids = [m["tool_call_id"] for m in tool_msgs]
        outputs = [m["content"] for m in tool_msgs]
        assert last["messages"][0]["role"] == "system"
    assert ids == ["c1", "c2", "c3", "c4", "c5"]
    assert outputs[0] == "__init__.py\nmodel.py" and "x * 3 + 1" in outputs[1]
    assert "KEY=nonenone" in outputs[3] and "[3.0]" in outputs[3]   # the agent's commands never see the key
    assert (tmp_path / "logs/commands/001.stdout").read_text().startswith("KEY=nonenone")
    assert "outside the worktree" in outputs[4]
    transcript = (tmp_path / "logs/transcript.jsonl").read_text()
    assert transcript.count('"kind": "retry"') == 2 and KEY not in transcript


@pytest.mark.parametrize("service", ["anthropic", "openai"])
def test_persistent_faults_stop_without_spending_the_round(service: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY" if service == "anthropic" else "OPENAI_API_KEY", KEY)
    err = anthropic_error if service == "anthropic" else openai_error
    script = Script([err(529 if service == "anthropic" else 502)] * 3 + [err(429)])
    eng = make_repo(tmp_path / "ws")
    with serve(script, "/v1/messages" if service == "anthropic" else "/chat/completions") as url:
        spec = toy_spec(eng, stages=("m1",), agent={"backend": service, "model": "test-model", "options": {
            "base_url": url if service == "anthropic" else url + "/v1", "retries": 3, "retry_base_s": 0.01}})
        out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=tmp_path / "s",
                        gate_fn=fake_gate).run()
    assert out.status == "agent_unavailable" and "after 3 retries" in out.message
    (rec,) = Ledger(tmp_path / "s/ledger.jsonl").rounds()
    assert rec.verdict == "agent_unavailable" and rec.counted is False and not rec.gates
    assert len(script.requests) == 4


@pytest.mark.parametrize("service", ["anthropic", "openai"])
def test_request_timeout_is_retried(service: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY" if service == "anthropic" else "OPENAI_API_KEY", KEY)
    wt = make_repo(tmp_path / "wt").parents[1]
    done = (anthropic_message([{"type": "text", "text": "ok"}], "end_turn", (7, 3)) if service == "anthropic"
            else openai_reply("ok", None, (7, 3)))
    script = Script([slow(done, 2.0), done])
    with serve(script, "/v1/messages" if service == "anthropic" else "/chat/completions") as url:
        backend = get_backend(service, {"base_url": url if service == "anthropic" else url + "/v1",
                                        "request_timeout_s": 0.5, "retry_base_s": 0.01}, "test-model")
        task = make_task(tmp_path, wt)
        res = backend.run(task)
    assert res.error is None and res.summary == "ok" and (task.meter.tokens_in, task.meter.tokens_out) == (7, 3)
    assert len(script.requests) == 2
    assert '"error": "APITimeoutError"' in (tmp_path / "logs/transcript.jsonl").read_text()


def test_bad_request_is_not_retried(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    script = Script([(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}})])
    wt = make_repo(tmp_path / "wt").parents[1]
    with serve(script, "/v1/messages") as url:
        backend = get_backend("anthropic", {"base_url": url, "retry_base_s": 0.01}, "test-model")
        with pytest.raises(Exception) as e:
            backend.run(make_task(tmp_path, wt))
    assert not isinstance(e.value, (AgentUnavailable, AgentFatal)) and len(script.requests) == 1


def test_missing_key_stops_the_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    wt = make_repo(tmp_path / "wt").parents[1]
    with pytest.raises(AgentFatal, match=r"\$OPENAI_API_KEY is not set"):
        get_backend("openai", {"base_url": "http://127.0.0.1:9/v1"}, "test-model").run(make_task(tmp_path, wt))


def test_anthropic_backend_in_the_loop(tmp_path: Path, monkeypatch) -> None:
    """Round 1: the model changes nothing useful and the gate fails; round 2 (its prompt carries the gate's
    localization) writes the fix. Tokens and prices reach the ledger; the key never does."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    eng = make_repo(tmp_path / "ws")
    script = Script([
        anthropic_message([{"type": "text", "text": "nothing to do"}], "end_turn", (1000, 10)),
        anthropic_tool_use("t1", "write_file", {"path": MODEL_PATH, "content": FIXED}, (2000, 200)),
        anthropic_message([{"type": "text", "text": "fixed"}], "end_turn", (2100, 5)),
    ])
    with serve(script, "/v1/messages") as url:
        spec = toy_spec(eng, stages=("m1",), agent={"backend": "anthropic", "model": "claude-test", "options": {
            "base_url": url, "retry_base_s": 0.01, "price_in_per_mtok": 3.0, "price_out_per_mtok": 15.0}})
        state = tmp_path / "s"
        out = ForgeLoop(spec, write_spec_file(tmp_path / "toy.toml"), engine=eng, state_dir=state, gate_fn=fake_gate).run()
    assert out.ok
    r1, r2 = Ledger(state / "ledger.jsonl").rounds()
    assert (r1.verdict, r2.verdict) == ("failed", "passed")
    assert (r2.tokens_in, r2.tokens_out) == (4100, 205) and r2.cost_usd == pytest.approx((4100 * 3 + 205 * 15) / 1e6)
    assert "engine 2.5, reference 2.0" in script.requests[1]["body"]["messages"][0]["content"]
    assert (eng / MODEL_PY).read_text() == FIXED
    for f in state.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes()
    assert json.loads((eng / "manifest.json").read_text())["forge"]["backend"] == "anthropic"
