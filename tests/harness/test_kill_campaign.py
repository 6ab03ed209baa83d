"""The kill campaign (issue 25, "Done when"): one forge run per backend, killed with kill -9 or Ctrl-C (SIGINT)
at ten points of a round and of the run around it, resumed after each kill. After every kill and at every point:
nothing of an earlier round is alive (by marker, by the round tag in its environment, by the process groups that
inflight.json recorded); the ledger plus the round in flight hold exactly the tokens the fake service served (no
double count, no loss); the planted keys are in no file of the run (state, logs, worktrees, the repository), in
no git object, and in no live process's environment but the CLI agent's own, inside its sandbox.

The points (forge_driver.py --pause, plus the agent's own hang): setup (a round set up, its agent not started),
agent (a CLI agent or an API tool command or a shell agent's child in a session of its own is running),
resume-orphans (resume ended the orphans, the interrupted round not yet recorded), resume (right after resume
starts), snapshot (the agent done, its edits not yet taken), between-rounds (a failed round judged, the next
not started), gate (an engine process of its own session runs under the gate), commit (the code commit made,
the manifest commit not), commit-ref (the ledger says passed, the branch not moved), between-stages.

Two signal schedules of all ten points, A and B, give every point both kill -9 and SIGINT: the shell backend (no
sandbox: kill -9 orphans live until resume ends them) runs A, codex (fake CLI, sandboxed, holding its own key)
B. openai (loopback wire server) is killed at its tool command with both signals and right after a resume ended
the orphans; replay (no agent process) in the gate's engine and before the branch update; tune (an ops stage) in
a trial of the per-op harness (its child process, in the round sandbox), with both signals. The anthropic and
claude_code backends' agent point is in test_signals.py. Each forge process imports torch (harness.isolation ->
gates.sandbox -> gates.context): a step costs 2-4 s, hence one schedule per backend."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forge_toy import BROKEN, FIXED, PARTIAL, git, make_repo, patch_between
from test_secrets import _ancestor_is_bwrap
from wire_servers import Script, openai_reply, openai_tool_call, serve

from harness.agents.shell import shell_usage_after_kill
from harness.ledger import Inflight, Ledger
from harness.procs import TAG, wait_gone

HERE = Path(__file__).resolve().parent
KEYS = {"ANTHROPIC_API_KEY": "sk-ant-api03-PLANTED-kill-campaign-a1b2c3d4e5f6",
        "OPENAI_API_KEY": "PLANTED-openai-kill-campaign-0f1e2d3c4b5a6978"}   # no known shape: exact value only
K, I = signal.SIGKILL, signal.SIGINT
FINAL = 99  # the last resume's step: no kill
SCHEDULES = {
    "A": [("setup", I), ("agent", K), ("resume-orphans", I), ("resume", K), ("snapshot", I), ("between-rounds", K),
          ("gate", I), ("commit", K), ("commit-ref", I), ("between-stages", K)],
    "B": [("agent", I), ("setup", K), ("resume-orphans", K), ("resume", I), ("snapshot", K), ("between-rounds", I),
          ("gate", K), ("commit", I), ("commit-ref", K), ("between-stages", I)],
    "agent": [("agent", K), ("resume-orphans", I), ("agent", I)],
    "tail": [("gate", K), ("commit-ref", I)],
}
# what the agent does in the round(s) a step runs (None: no agent runs before the point)
MODE = {"setup": None, "agent": "hang", "resume-orphans": None, "resume": None, "snapshot": "partial",
        "between-rounds": "partial", "gate": "fix", "commit": "fix", "commit-ref": "fix", "between-stages": None}

SHELL = r'''
set -eu
echo "300 30" >> "$FORGE_OUT_DIR/served"  # what it reports in its usage file (cumulative over its run)
echo '{"tokens_in": 300, "tokens_out": 30}' > "$FORGE_USAGE_FILE"
case "$MODE" in
  hang) setsid bash -c 'exec -a "$MARK" sleep 300' &
        bash -c 'exec -a "$MARK" sleep 300' &
        echo "# half-written edit" >> "$FORGE_ENGINE_DIR/src/toy_engine/model.py"
        touch "$FORGE_OUT_DIR/at-agent"; wait ;;
  partial) cp "$CTRL/partial.py" "$FORGE_ENGINE_DIR/src/toy_engine/model.py" ;;
  fix) cp "$CTRL/fixed.py" "$FORGE_ENGINE_DIR/src/toy_engine/model.py" ;;
esac
'''

CODEX = r'''#!/usr/bin/env python3
import json, os, sys
sys.stdin.read()
mode, out = os.environ["MODE"], os.environ["FORGE_OUT_DIR"]
def emit(ev):
    print(json.dumps(ev), flush=True)
emit({"type": "thread.started", "thread_id": "t1"})
emit({"type": "item.completed", "item": {"type": "agent_message", "text": "my key " + os.environ["OPENAI_API_KEY"]}})
with open(os.path.join(out, "served"), "a") as f:     # what the service served, before forge can read it
    f.write("400 40\n")
emit({"type": "turn.completed", "usage": {"input_tokens": 400, "cached_input_tokens": 100, "output_tokens": 40}})
if mode == "hang":
    open(os.path.join(out, "at-agent"), "w").close()
    os.execvp("bash", ["bash", "-c", 'exec -a "$MARK" sleep 300'])
src = {"partial": "partial.py", "fix": "fixed.py"}[mode]
open("exports/toy_engine/src/toy_engine/model.py", "w").write(open(os.path.join(os.environ["CTRL"], src)).read())
emit({"type": "item.completed", "item": {"type": "agent_message", "text": "done"}})
'''


# tune: the real engine's ops beside the toy model; its swiglu kernel hangs in a trial of block 512 in MODE=hang
ENGINE_PKG = HERE.parents[1] / "exports/train_engine_0.5B/src/train_engine_0_5b"
HANG = ("    n_col_blocks = triton.cdiv(f, block)\n", '''    if os.environ.get("MODE") == "hang" and block != 1024:
        open(os.path.join(os.environ["FORGE_OUT_DIR"], "at-agent"), "w").close()
        os.execvp("bash", ["bash", "-c", 'exec -a "$MARK" sleep 300'])
    n_col_blocks = triton.cdiv(f, block)
''')


def _procs() -> list[tuple[int, bytes, bytes]]:
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        out.append((int(pid), cmd, env))
    return out


class Campaign:
    def __init__(self, tmp: Path, backend: str) -> None:
        self.tmp, self.backend = tmp, backend
        self.eng = make_repo(tmp / "ws", FIXED if backend == "tune" else BROKEN)
        if backend == "tune":
            self._add_engine_ops()
        self.state, self.ctrl = tmp / "state", tmp / "ctrl"
        self.ctrl.mkdir()
        (self.ctrl / "fixed.py").write_text(FIXED)
        (self.ctrl / "partial.py").write_text(PARTIAL)
        self.marker = f"orphan:{tmp}:"
        self.groups: list[int] = []           # process groups inflight.json recorded at a kill
        self.script: Script | None = None
        self.sent: list[tuple[int, int]] = []  # the scripted replies' tokens, in order
        self.url = ""
        self.patches = {m: patch_between(self.eng, src) for m, src in (("partial", PARTIAL), ("fix", FIXED))}
        self.recording = tmp / "recording"
        self.recording.mkdir()

    def _add_engine_ops(self) -> None:
        pkg = self.eng / "src/train_engine_0_5b"
        shutil.copytree(ENGINE_PKG, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.gz"))
        kernel = pkg / "ops/swiglu/triton_fused.py"
        kernel.write_text(kernel.read_text().replace(*HANG).replace("import torch\n", "import os\n\nimport torch\n", 1))
        table = pkg / "ops/table.py"  # swiglu=triton_fused is what auto runs on a CPU: the step runs what tune tunes
        table.write_text(table.read_text().replace('            "num_warps": Param(4, (1, 2, 4, 8))}))),\n',
                                                   '            "num_warps": Param(4, (1, 2, 4, 8))})), '
                                                   'defaults={"cpu": ("triton_fused",)}),\n'))
        git(self.eng, "add", "-A")
        git(self.eng, "commit", "-qm", "the engine's ops beside the toy model")

    # -- the agent of a step --------------------------------------------------------------------------
    def agent(self, mode: str | None, step: int) -> dict:
        mark = f"{self.marker}{step}"
        env = {"MODE": mode or "fix", "MARK": mark, "CTRL": str(self.ctrl)}
        share = [str(self.ctrl)]
        if self.backend == "shell":
            (self.tmp / "agent.sh").write_text(SHELL)
            return {"backend": "shell", "options": {"command": f"bash {self.tmp / 'agent.sh'}"}, "env": env,
                    "sandbox": "off"}
        if self.backend == "tune":
            return {"env": env}
        if self.backend == "codex":
            bin_dir = self.tmp / "bin"
            bin_dir.mkdir(exist_ok=True)
            (bin_dir / "codex").write_text(CODEX)
            (bin_dir / "codex").chmod(0o755)
            return {"backend": "codex", "sandbox": "required", "share": share,
                    "env": env | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}}
        if self.backend == "openai":
            assert self.script is not None
            replies = []
            if mode == "hang":
                hang = f'touch "$FORGE_OUT_DIR/at-agent"; exec -a "{mark}" sleep 300'
                replies = [openai_tool_call("h1", "run_command", {"command": hang}, (1000, 100))]
            elif mode:
                replies = [openai_tool_call("w1", "write_file", {"path": "exports/toy_engine/src/toy_engine/model.py",
                                                                 "content": FIXED if mode == "fix" else PARTIAL},
                                            (200, 20)),
                           openai_reply("done", None, (30, 3))]
            if mode and step == FINAL and not any(r.verdict == "passed" for r in self._ledger().rounds()):
                replies = replies * 2  # the last resume runs m1's round and m2's
            for r in replies:
                self.script.replies.append(r)
                self.sent.append((r[1]["usage"]["prompt_tokens"], r[1]["usage"]["completion_tokens"]))
            return {"backend": "openai", "model": "test-model", "sandbox": "required",
                    "options": {"base_url": self.url + "/v1", "retry_base_s": 0.01}}
        assert self.backend == "replay"
        for p in self.recording.glob("*.patch"):
            p.unlink()
        n = self._next_round("m1")   # m1's rounds only: m2 passes without an edit
        for k in range(n, n + 3):      # a step runs at most two rounds
            if mode in self.patches:
                (self.recording / f"m1-r{k}.patch").write_text(self.patches[mode])
        return {"backend": "replay", "options": {"recording": str(self.recording)}, "sandbox": "required"}

    def _next_round(self, key: str) -> int:
        rounds = [r.round for r in self._ledger().rounds() if r.key == key]
        inf = self._inflight()
        if inf is not None and inf.key == key:
            rounds.append(inf.round)
        return max(rounds, default=0) + 1

    # -- observations ---------------------------------------------------------------------------------
    def _ledger(self) -> Ledger:
        return Ledger(self.state / "ledger.jsonl")

    def _inflight(self) -> Inflight | None:
        f = self.state / "inflight.json"
        try:
            return Inflight.model_validate_json(f.read_text())
        except (OSError, ValueError):
            return None

    def served(self) -> tuple[int, int]:
        if self.script is not None:
            got = self.sent[:len(self.script.requests)]
        else:
            got = [tuple(int(x) for x in line.split()) for f in self.state.glob("rounds/*/agent/out/served")
                   for line in f.read_text().split("\n") if line.strip()]
        return sum(t[0] for t in got), sum(t[1] for t in got)

    def counted(self) -> tuple[int, int]:
        """The ledger's tokens, plus the round in flight's where no line records it yet (a shell agent's: what its
        usage file says, which forge reads when the agent ends, or on resume after a kill -9)."""
        rounds = self._ledger().rounds()
        tin, tout = sum(r.tokens_in or 0 for r in rounds), sum(r.tokens_out or 0 for r in rounds)
        inf = self._inflight()
        if inf is not None and not any(r.key == inf.key and r.round == inf.round for r in rounds):
            if inf.backend == "shell" and inf.outbox:
                inf = shell_usage_after_kill(inf, Path(inf.outbox))
            tin, tout = tin + (inf.tokens_in or 0), tout + (inf.tokens_out or 0)
        return tin, tout

    def check_no_leftovers(self, before_step: int, tags: set[str]) -> None:
        """Nothing of steps before `before_step` alive: by marker, round tag, recorded group."""
        def stale(cmd: bytes, env: bytes) -> bool:
            for m in re.finditer(re.escape(self.marker.encode()) + rb"(\d+)", cmd):
                if int(m.group(1)) < before_step:
                    return True
            return any(f"{TAG}={t}".encode() in env.split(b"\0") for t in tags)
        pids = [p for p, cmd, env in _procs() if stale(cmd, env)]
        assert wait_gone(pids, 5), f"processes of an earlier round outlived it: {pids}"
        for g in self.groups:
            try:
                os.killpg(g, 0)
            except ProcessLookupError:
                continue
            members = [p for p, _, _ in _procs() if _pgid(p) == g]
            assert not members, f"recorded group {g} is still alive: {members}"

    def check_keys(self, forge_pid: int | None, own: str | None) -> None:
        """No key in forge's environment; a key only in its own CLI agent's processes, inside the sandbox (after
        a kill -9 those die with forge: given 5 s)."""
        end = time.monotonic() + 5
        while True:
            bad = [(pid, name) for pid, cmd, env in _procs() for name, value in KEYS.items() if value.encode() in env
                   and not (pid != forge_pid and name == own and (b"bwrap" in cmd or _ancestor_is_bwrap(pid)))]
            if not bad or forge_pid is not None or time.monotonic() > end:
                break
            time.sleep(0.1)
        assert not bad, f"a key in the environment of {bad}"

    def check_storage(self) -> None:
        for f in self.tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                assert not any(v.encode() in data for v in KEYS.values()), f
        objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=self.tmp / "ws",
                                 capture_output=True).stdout
        assert objects and not any(v.encode() in objects for v in KEYS.values())

    # -- one step: start, reach the point, check, kill ---------------------------------------------------
    def argv(self, agent: dict, point: str | None, resume: bool) -> list[str]:
        extra = []
        if self.backend == "tune":  # m1 (the engine is fixed already: replay makes no edit), then ops by tune
            agent, extra = ({"backend": "replay", "sandbox": "required"},
                            ["--stages", "m1", "--ops", json.dumps(self.ops_stage(agent))])
        return ([sys.executable, str(HERE / "forge_driver.py"), str(self.eng), str(self.state), "-", str(self.ctrl),
                 "--agent", json.dumps(agent)] + (["--pause", point] if point and point != "agent" else [])
                + (["--resume"] if resume else []) + extra)

    def ops_stage(self, agent: dict) -> dict:
        return {"name": "ops", "kind": "ops", "ops": ["swiglu"], "rounds": 2, "gates": [{"name": "m1_forward"}],
                "timing": {"metric": "time_s"},
                "agent": {"backend": "tune", "sandbox": "required", "share": [str(self.ctrl)], "env": agent["env"],
                          "options": {"impl": "triton_fused", "space": {"block": [512]},
                                      "harness": {"seq": 8, "reps": 2, "warmup": 1}}}}

    def step(self, i: int, point: str | None, sig: int | None, tags: set[str]) -> str:
        for f in [*self.ctrl.glob("at-*"), *self.state.glob("rounds/*/agent/out/at-agent")]:
            f.unlink()
        resume = (self.state / "run.json").exists()
        env = {**os.environ, **KEYS, "FORGE_TEST_MARK": f"{self.marker}{i}"}
        argv = self.argv(self.agent(MODE.get(point or "", "fix"), i), point, resume)
        if point is None:
            r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
            assert r.returncode == 0 and "STATUS passed" in r.stdout, r.stdout + r.stderr
            return r.stdout
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        t0 = time.monotonic()
        reached = lambda: (any(self.state.glob("rounds/*/agent/out/at-agent")) if point == "agent"  # noqa: E731
                           else (self.ctrl / f"at-{point}").exists())
        while not reached():
            if proc.poll() is not None:
                raise AssertionError(f"step {i}: the run ended before {point}: {proc.stdout.read()}")
            assert time.monotonic() - t0 < 60, f"step {i}: {point} never reached"
            time.sleep(0.05)
        if point in ("agent", "gate"):
            time.sleep(0.7)  # the watcher has seen every group
        # at the point: earlier rounds' processes gone (resume ended them), usage consistent, keys where they may be
        if point != "resume":
            self.check_no_leftovers(i, tags)
        assert self.counted() == self.served(), (point, self.counted(), self.served())
        self.check_keys(proc.pid, "OPENAI_API_KEY" if self.backend == "codex" else None)
        inf = self._inflight()
        if inf is not None:
            self.groups += [p.pgid for p in inf.procs]
            tags.add(f"{json.loads((self.state / 'run.json').read_text())['run_id']}/{inf.key}-r{inf.round:02d}")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == (-9 if sig == K else 128 + sig), f"step {i} {point}: {out}"
        if sig == I:  # a Ctrl-C ends the round's tree before forge exits
            assert "STATUS interrupted" in out
            self.check_no_leftovers(i + 1, tags)
        self.check_keys(None, None)
        self.check_storage()
        return out


def _pgid(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(text[text.rindex(")") + 2:].split()[2])


@pytest.mark.slow
@pytest.mark.parametrize("backend,schedule", [("shell", "A"), ("codex", "B"), ("openai", "agent"), ("replay", "tail")])
def test_kill_campaign(backend: str, schedule: str, tmp_path: Path) -> None:
    c = Campaign(tmp_path, backend)
    tags: set[str] = set()
    script = Script([])
    with serve(script, "/chat/completions") as url:
        if backend == "openai":
            c.script, c.url = script, url
        kills = 0
        for i, (point, sig) in enumerate(SCHEDULES[schedule], start=1):
            if point == "agent" and backend == "replay":
                continue  # no agent process to kill
            if point == "resume-orphans" and not (c.state / "inflight.json").exists():
                continue  # nothing for resume to end: the last kill was not mid-round
            c.step(i, point, sig, tags)
            kills += 1
        c.step(FINAL, None, None, tags)
    assert kills >= min(9, len(SCHEDULES[schedule]))
    c.check_no_leftovers(100, tags)
    c.check_keys(None, None)
    c.check_storage()
    ledger = c._ledger()
    rounds = ledger.rounds()
    assert not (c.state / "inflight.json").exists()
    assert len({(r.key, r.round) for r in rounds}) == len(rounds), "a round recorded twice"
    assert [r.key for r in rounds if r.verdict == "passed"] == ["m1", "m2"]
    assert {r.verdict for r in rounds} <= {"interrupted", "failed", "passed"}
    totals = ledger.totals()
    assert (totals["tokens_in"], totals["tokens_out"]) == c.served()
    if backend in ("codex", "openai", "shell"):
        assert c.served()[0] > 0


@pytest.mark.slow
def test_kill_campaign_tune(tmp_path: Path) -> None:
    """tune: a trial's timing command (in the round sandbox) is killed with kill -9, then with SIGINT; resume
    ends it, the op's rounds go on, and the elected candidate is committed once."""
    c = Campaign(tmp_path, "tune")
    tags: set[str] = set()
    for i, (point, sig) in enumerate(SCHEDULES["agent"], start=1):
        if point == "resume-orphans" and not (c.state / "inflight.json").exists():
            continue
        c.step(i, point, sig, tags)
    c.step(FINAL, None, None, tags)
    c.check_no_leftovers(FINAL + 1, tags)
    c.check_keys(None, None)
    c.check_storage()
    rounds = [r for r in c._ledger().rounds() if r.stage == "ops"]
    assert [r.verdict for r in rounds] == ["interrupted", "interrupted", "passed", "failed"], rounds
    assert rounds[2].elected and rounds[2].timing == 0.001 and len({r.round for r in rounds}) == len(rounds)
