"""The kill campaign's machinery (test_kill_campaign.py): one forge run of one backend, killed at a point of a
round with kill -9 or SIGINT, resumed, and checked at the point and after the kill.

Each backend's agent is offline: the shell agent a bash script; codex and claude_code fake CLIs on the agent's
PATH (in the round sandbox, each holding its own key); openai and anthropic the loopback wire servers
(wire_servers.py); replay recorded patches (its agent point is inside the backend, in forge's own process);
tune the real engine's swiglu op beside the toy model, its trials run by the per-op harness. A step's agent
mode says what it does: `hang` (at the agent point: a process named after the step that never ends), `partial`
(an edit the gates fail), `fix` (the edit that passes).

What the service served is counted outside forge: the CLIs and the shell agent append it to `served` in their
outbox before forge can read it; the wire servers record every reply sent."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from forge_toy import BROKEN, FIXED, PARTIAL, git, make_repo, patch_between
from test_secrets import _ancestor_is_bwrap
from wire_servers import (Script, anthropic_message, anthropic_tool_use, openai_reply, openai_tool_call,
                          reply_tokens)

from harness.agents.shell import shell_usage_after_kill
from harness.ledger import Inflight, Ledger
from harness.procs import TAG, wait_gone

HERE = Path(__file__).resolve().parent
# planted keys, made unique per campaign (a process holding one is this campaign's, whatever else runs here)
KEYS = {"ANTHROPIC_API_KEY": "sk-ant-api03-PLANTED-kill-campaign-",
        "OPENAI_API_KEY": "PLANTED-openai-kill-campaign-"}   # no known shape: exact value only
OWN_KEY = {"codex": "OPENAI_API_KEY", "claude_code": "ANTHROPIC_API_KEY"}   # a CLI agent's own, in its sandbox
K, I = signal.SIGKILL, signal.SIGINT
FINAL = 99  # the last resume's step: no kill
POINTS = ("setup", "agent", "resume-orphans", "resume", "snapshot", "between-rounds", "gate", "commit", "commit-ref",
          "between-stages")
# what the agent does in the round(s) a step runs (None: no agent runs before the point; it fixes if one does)
MODE = {"setup": None, "agent": "hang", "resume-orphans": None, "resume": None, "snapshot": "partial",
        "between-rounds": "partial", "gate": "fix", "commit": "fix", "commit-ref": "fix", "between-stages": None}
API_ROUTE = {"openai": "/chat/completions", "anthropic": "/v1/messages"}
PROBE = "env; cat /proc/[0-9]*/environ | tr '\\0' '\\n'; tr '\\0' '\\n' < /proc/$PPID/environ"  # in the sandbox

SHELL = r'''
set -eu
p=$PPID  # no sandbox: it reads forge's own environment (sealed: no key there)
until grep -q forge_driver "/proc/$p/cmdline" || [ "$p" -le 1 ]; do p=$(cut -d' ' -f4 "/proc/$p/stat"); done
[ "$p" -gt 1 ] || exit 3
tr '\0' '\n' < "/proc/$p/environ" > "$FORGE_OUT_DIR/forge-environ"
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
if mode == "hang":  # its own key, where it may write: forge scrubs both when the round ends, or on resume
    for f in (os.path.join(out, "notes"), "notes.txt"):
        open(f, "w").write("key " + os.environ["OPENAI_API_KEY"] + "\n")
    open(os.path.join(out, "at-agent"), "w").close()
    os.execvp("bash", ["bash", "-c", 'exec -a "$MARK" sleep 300'])
src = {"partial": "partial.py", "fix": "fixed.py"}[mode]
open("exports/toy_engine/src/toy_engine/model.py", "w").write(open(os.path.join(os.environ["CTRL"], src)).read())
emit({"type": "item.completed", "item": {"type": "agent_message", "text": "done"}})
'''

# One message streams in two lines (counted once), a second after the edit; the result's totals replace the stream's.
CLAUDE = r'''#!/usr/bin/env python3
import json, os, sys
sys.stdin.read()
mode, out = os.environ["MODE"], os.environ["FORGE_OUT_DIR"]
def emit(ev):
    print(json.dumps(ev), flush=True)
def served(tin, tout):  # what the service served, before forge can read it
    with open(os.path.join(out, "served"), "a") as f:
        f.write(f"{tin} {tout}\n")
emit({"type": "system", "subtype": "init", "note": "my key " + os.environ["ANTHROPIC_API_KEY"]})
served(300, 30)
for _ in range(2):
    emit({"type": "assistant", "message": {"id": "msg_1", "usage": {
        "input_tokens": 200, "cache_read_input_tokens": 100, "output_tokens": 30}}})
if mode == "hang":  # its own key, where it may write: forge scrubs both when the round ends, or on resume
    for f in (os.path.join(out, "notes"), "notes.txt"):
        open(f, "w").write("key " + os.environ["ANTHROPIC_API_KEY"] + "\n")
    open(os.path.join(out, "at-agent"), "w").close()
    os.execvp("bash", ["bash", "-c", 'exec -a "$MARK" sleep 300'])
src = {"partial": "partial.py", "fix": "fixed.py"}[mode]
open("exports/toy_engine/src/toy_engine/model.py", "w").write(open(os.path.join(os.environ["CTRL"], src)).read())
served(200, 20)
emit({"type": "assistant", "message": {"id": "msg_2", "usage": {"input_tokens": 200, "output_tokens": 20}}})
emit({"type": "result", "subtype": "success", "is_error": False, "result": "done", "num_turns": 2,
      "usage": {"input_tokens": 400, "cache_read_input_tokens": 100, "output_tokens": 50}, "total_cost_usd": 0.01})
'''

# tune: the real engine's ops beside the toy model; its swiglu kernel, in a trial of block 512, hangs in MODE=hang
# and fails in MODE=partial (no correct candidate: the round is an error)
ENGINE_PKG = HERE.parents[1] / "exports/train_engine_0.5B/src/train_engine_0_5b"
KERNEL_EDIT = ("    n_col_blocks = triton.cdiv(f, block)\n",
               '''    if os.environ.get("MODE") == "hang" and block != 1024:
        open(os.path.join(os.environ["FORGE_OUT_DIR"], "at-agent"), "w").close()
        os.execvp("bash", ["bash", "-c", 'exec -a "$MARK" sleep 300'])
    if os.environ.get("MODE") == "partial" and block != 1024:
        raise RuntimeError("a half-made kernel edit")
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


def _pgid(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(text[text.rindex(")") + 2:].split()[2])


class Campaign:
    """One backend's run under kills. `script` and `url`: the wire server of an API backend."""

    def __init__(self, tmp: Path, backend: str, script: Script | None = None, url: str = "") -> None:
        self.tmp, self.backend, self.script, self.url = tmp, backend, script, url
        self.keys = {name: prefix + uuid.uuid4().hex for name, prefix in KEYS.items()}
        self.eng = make_repo(tmp / "ws", FIXED if backend == "tune" else BROKEN)
        if backend == "tune":
            self._add_engine_ops()
        self.state, self.ctrl = tmp / "state", tmp / "ctrl"
        self.ctrl.mkdir()
        (self.ctrl / "fixed.py").write_text(FIXED)
        (self.ctrl / "partial.py").write_text(PARTIAL)
        self.marker = f"orphan:{tmp}:"
        self.groups: list[int] = []           # process groups inflight.json recorded at a kill
        self.tags: set[str] = set()           # the round tags of the rounds a kill interrupted
        self.patches = {m: patch_between(self.eng, src) for m, src in (("partial", PARTIAL), ("fix", FIXED))}
        self.recording = tmp / "recording"
        self.recording.mkdir()

    def _add_engine_ops(self) -> None:
        pkg = self.eng / "src/train_engine_0_5b"
        shutil.copytree(ENGINE_PKG, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.gz"))
        kernel = pkg / "ops/swiglu/triton_fused.py"
        text = kernel.read_text()
        assert KERNEL_EDIT[0] in text, "the swiglu kernel's launch changed: update KERNEL_EDIT"
        kernel.write_text(text.replace(*KERNEL_EDIT).replace("import torch\n", "import os\n\nimport torch\n", 1))
        table = pkg / "ops/table.py"  # swiglu=triton_fused is what auto runs on a CPU: the step runs what tune tunes
        table.write_text(table.read_text().replace('            "num_warps": Param(4, (1, 2, 4, 8))}))),\n',
                                                   '            "num_warps": Param(4, (1, 2, 4, 8))})), '
                                                   'defaults={"cpu": ("triton_fused",)}),\n'))
        git(self.eng, "add", "-A")
        git(self.eng, "commit", "-qm", "the engine's ops beside the toy model")

    # -- the agent of a step --------------------------------------------------------------------------
    def agent(self, mode: str | None, step: int) -> dict:
        mode = mode or "fix"
        env = {"MODE": mode, "MARK": f"{self.marker}{step}", "CTRL": str(self.ctrl)}
        if self.backend == "shell":  # no sandbox: its kill -9 orphans live until resume ends them
            (self.tmp / "agent.sh").write_text(SHELL)
            return {"backend": "shell", "options": {"command": f"bash {self.tmp / 'agent.sh'}"}, "env": env,
                    "sandbox": "off"}
        if self.backend == "tune":
            return {"env": env}
        if self.backend in ("codex", "claude_code"):
            bin_dir = self.tmp / "bin"
            bin_dir.mkdir(exist_ok=True)
            exe = bin_dir / ("codex" if self.backend == "codex" else "claude")
            exe.write_text(CODEX if self.backend == "codex" else CLAUDE)
            exe.chmod(0o755)
            return {"backend": self.backend, "sandbox": "required", "share": [str(self.ctrl)],
                    "env": env | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}}
        if self.backend in API_ROUTE:
            self._script_replies(mode, env["MARK"])
            base = self.url + ("/v1" if self.backend == "openai" else "")
            return {"backend": self.backend, "model": "test-model", "sandbox": "required",
                    "options": {"base_url": base, "retry_base_s": 0.01}}
        assert self.backend == "replay"
        for p in self.recording.glob("*.patch"):
            p.unlink()
        n = self._next_round("m1")   # m1's rounds only: m2 passes without an edit
        for k in range(n, n + 3):      # a step runs at most two rounds
            (self.recording / f"m1-r{k}.patch").write_text(self.patches["fix" if mode == "fix" else "partial"])
        return {"backend": "replay", "options": {"recording": str(self.recording)}, "sandbox": "required"}

    def _script_replies(self, mode: str, mark: str) -> None:
        """The service's replies for a step: a tool command that hangs, or an edit and a last word for each of
        up to two rounds. What an earlier step left unsent is dropped: it is never served."""
        assert self.script is not None
        oa = self.backend == "openai"
        call = openai_tool_call if oa else anthropic_tool_use
        if mode == "hang":
            hang = f'touch "$FORGE_OUT_DIR/at-agent"; exec -a "{mark}" sleep 300'
            replies = [call("h1", "run_command", {"command": hang}, (1000, 100))]
        else:  # first what a model hunting for keys would run: its output goes back to the service
            probe = call("p1", "run_command", {"command": PROBE}, (100, 10))
            edit = call("w1", "write_file", {"path": "exports/toy_engine/src/toy_engine/model.py",
                                             "content": FIXED if mode == "fix" else PARTIAL}, (200, 20))
            done = (openai_reply("done", None, (30, 3)) if oa
                    else anthropic_message([{"type": "text", "text": "done"}], "end_turn", (30, 3)))
            replies = [probe, edit, done] * 2
        with self.script.lock:
            self.script.replies[:] = replies

    def _next_round(self, key: str) -> int:
        rounds = [r.round for r in self.ledger().rounds() if r.key == key]
        inf = self.inflight()
        if inf is not None and inf.key == key:
            rounds.append(inf.round)
        return max(rounds, default=0) + 1

    # -- observations ---------------------------------------------------------------------------------
    def ledger(self) -> Ledger:
        return Ledger(self.state / "ledger.jsonl")

    def inflight(self) -> Inflight | None:
        try:
            return Inflight.model_validate_json((self.state / "inflight.json").read_text())
        except (OSError, ValueError):
            return None

    def served(self) -> tuple[int, int]:
        """The tokens the service (or the shell agent's own report) served, as counted outside forge."""
        if self.script is not None:
            got = [reply_tokens(r) for r in self.script.served]
        else:
            got = [tuple(int(x) for x in line.split()) for f in self.state.glob("rounds/*/agent/out/served")
                   for line in f.read_text().split("\n") if line.strip()]
        return sum(t[0] for t in got), sum(t[1] for t in got)

    def counted(self) -> tuple[int, int]:
        """The ledger's tokens, plus the round in flight's where no line records it yet (a shell agent's: what its
        usage file says, which forge reads when the agent ends, or on resume after a kill -9)."""
        rounds = self.ledger().rounds()
        tin, tout = sum(r.tokens_in or 0 for r in rounds), sum(r.tokens_out or 0 for r in rounds)
        inf = self.inflight()
        if inf is not None and not any(r.key == inf.key and r.round == inf.round for r in rounds):
            if inf.backend == "shell" and inf.outbox:
                inf = shell_usage_after_kill(inf, Path(inf.outbox))
            tin, tout = tin + (inf.tokens_in or 0), tout + (inf.tokens_out or 0)
        return tin, tout

    def check_no_leftovers(self, before_step: int) -> None:
        """Nothing of steps before `before_step` alive: by marker, round tag, recorded group."""
        def stale(cmd: bytes, env: bytes) -> bool:
            for m in re.finditer(re.escape(self.marker.encode()) + rb"(\d+)", cmd):
                if int(m.group(1)) < before_step:
                    return True
            return any(f"{TAG}={t}".encode() in env.split(b"\0") for t in self.tags)
        pids = [p for p, cmd, env in _procs() if stale(cmd, env)]
        assert wait_gone(pids, 5), f"processes of an earlier round outlived it: {pids}"
        for g in self.groups:
            try:
                os.killpg(g, 0)
            except ProcessLookupError:
                continue
            members = [p for p, _, _ in _procs() if _pgid(p) == g]
            assert not members, f"recorded group {g} is still alive: {members}"

    def check_keys(self, forge_pid: int | None) -> None:
        """No key in forge's environment; a key only in its own CLI agent's processes, inside the sandbox (after
        a kill -9 those die with forge: given 5 s)."""
        own = OWN_KEY.get(self.backend) if forge_pid is not None else None
        end = time.monotonic() + 5
        while True:
            bad = [(pid, name) for pid, cmd, env in _procs() for name, value in self.keys.items()
                   if value.encode() in env
                   and not (pid != forge_pid and name == own and (b"bwrap" in cmd or _ancestor_is_bwrap(pid)))]
            if not bad or forge_pid is not None or time.monotonic() > end:
                break
            time.sleep(0.1)
        assert not bad, f"a key in the environment of {bad}"

    def check_storage(self) -> None:
        """No key in any file of the run (state, logs, worktrees, the repository) nor in any git object; but a CLI
        agent's own key in what it wrote itself (its outbox, its worktree) while its round is in flight: live, or
        killed -9 and not yet resumed (no forge runs then to scrub it)."""
        inf = self.inflight()
        own = [Path(inf.worktree), Path(inf.outbox or inf.worktree)] if inf and self.backend in OWN_KEY else []
        for f in self.tmp.rglob("*"):
            if f.is_file() and not f.is_symlink() and not any(f.is_relative_to(d) for d in own):
                data = f.read_bytes()
                assert not any(v.encode() in data for v in self.keys.values()), f
        objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=self.tmp / "ws",
                                 capture_output=True).stdout
        assert objects and not any(v.encode() in objects for v in self.keys.values())
        if self.script is not None:  # nor in what went back to the service (tool results)
            bodies = [json.dumps(r["body"]) for r in self.script.requests]
            assert not any(v in b for v in self.keys.values() for b in bodies)

    def check_probes(self) -> None:
        """The key hunts ran (else check_storage proves nothing of them): the shell agent read forge's environment,
        the API tool command's output went back to the service."""
        if self.backend == "shell":
            assert any("PATH=" in f.read_text() for f in self.state.glob("rounds/*/agent/out/forge-environ"))
        if self.script is not None:
            assert any(f"{TAG}=" in json.dumps(r["body"]) for r in self.script.requests)

    # -- one step: start, reach the point, check, kill ---------------------------------------------------
    def argv(self, agent: dict, point: str | None, resume: bool) -> list[str]:
        extra = []
        if self.backend == "tune":  # m1 (the engine is fixed already: replay makes no edit), then ops by tune
            agent, extra = ({"backend": "replay", "sandbox": "required"},
                            ["--stages", "m1", "--ops", json.dumps(self.ops_stage(agent)), "--pause-key", "ops-swiglu"])
        in_process = self.backend == "replay"  # an agent process reaches the agent point by itself
        pause = ["--pause", point] if point and (point != "agent" or in_process) else []
        return ([sys.executable, str(HERE / "forge_driver.py"), str(self.eng), str(self.state), "-", str(self.ctrl),
                 "--agent", json.dumps(agent)] + pause + (["--resume"] if resume else []) + extra)

    def ops_stage(self, agent: dict) -> dict:
        return {"name": "ops", "kind": "ops", "ops": ["swiglu"], "rounds": 3, "gates": [{"name": "m1_forward"}],
                "timing": {"metric": "time_s"},
                "agent": {"backend": "tune", "sandbox": "required", "share": [str(self.ctrl)], "env": agent["env"],
                          "options": {"impl": "triton_fused", "space": {"block": [512]},
                                      "harness": {"seq": 8, "reps": 2, "warmup": 1}}}}

    def step(self, i: int, point: str | None, sig: int | None) -> str:
        """Run step `i` to `point`, check there, send `sig`, check after; point None: run to the end."""
        for f in [*self.ctrl.glob("at-*"), *self.state.glob("rounds/*/agent/out/at-agent")]:
            f.unlink()
        resume = (self.state / "run.json").exists()
        env = {**os.environ, **self.keys, "FORGE_TEST_MARK": f"{self.marker}{i}"}
        argv = self.argv(self.agent(MODE.get(point or "", "fix"), i), point, resume)
        if point is None:
            r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 0 and "STATUS passed" in r.stdout, r.stdout + r.stderr
            return r.stdout
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            self._at_point(proc, i, point)
        except BaseException:  # a failing check leaves nothing of the step running
            proc.kill()
            proc.wait()
            for pid, cmd, _ in _procs():
                if self.marker.encode() in cmd:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            raise
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == (-9 if sig == K else 128 + sig), f"step {i} {point}: {out}"
        if sig == I:  # a Ctrl-C ends the round's tree before forge exits
            assert "STATUS interrupted" in out
            self.check_no_leftovers(i + 1)
        self.check_keys(None)
        self.check_storage()
        return out

    def _at_point(self, proc: subprocess.Popen, i: int, point: str) -> None:
        """Wait until step `i`'s run is at `point`, then check there and note the round in flight's groups and tag."""
        t0 = time.monotonic()
        reached = lambda: (any(self.state.glob("rounds/*/agent/out/at-agent")) if point == "agent"  # noqa: E731
                           else (self.ctrl / f"at-{point}").exists())
        while not reached():
            if proc.poll() is not None:
                raise AssertionError(f"step {i}: the run ended before {point}: {proc.stdout.read()}")
            assert time.monotonic() - t0 < 120, f"step {i}: {point} never reached"
            time.sleep(0.05)
        if point in ("agent", "gate"):
            time.sleep(0.7)  # the watcher has seen every group
        # at the point: earlier rounds' processes gone (resume ended them), usage consistent, keys where they may be
        if point != "resume":
            self.check_no_leftovers(i)
        assert self.counted() == self.served(), (point, self.counted(), self.served())
        self.check_keys(proc.pid)
        self.check_storage()
        inf = self.inflight()
        if inf is not None:
            self.groups += [p.pgid for p in inf.procs]
            self.tags.add(f"{json.loads((self.state / 'run.json').read_text())['run_id']}/{inf.key}-r{inf.round:02d}")
