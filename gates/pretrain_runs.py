"""How a gate runs the engine's own `pretrain` on a case (gates/train_contract.py): the sandbox gets the
case's weights as a Hugging Face directory and its batches as a token-batches file; the run's log is read
back into the probe contract's series. Used by M5 (speed), M7 (the training path) and M8 (resume)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from gates.case import Case
from gates.context import GateRun, GateStop, last_line
from gates.launch import Sandbox
from gates.report import Command, Localization
from gates.train_contract import LogError, pretrain_args, read_log, read_state, write_init_dir, write_token_batches

RUN_PREFIX = "run-"  # a neutral sandbox name: the gate's runs look like a user's, not like "forge-engine-"


class PretrainBox:
    """A sandbox holding `init/` (HF MiniCPM dir), `batches.safetensors` and the runs' save dirs and logs."""

    def __init__(self, g: GateRun, case: Case):
        self.g, self.case = g, case
        self.box: Sandbox = g.sandbox(None, prefix=RUN_PREFIX)
        self.root = self.box.root
        self.init = write_init_dir(self.root / "init", case.spec.model, case.weights)
        self.batches = write_token_batches(self.root / "batches.safetensors", case)

    def use_case(self, case: Case) -> None:
        """Run `case` from now on: its batches written anew, `init/` kept as written, so `case` must carry this
        box's weights (M5 writes its sized case with them)."""
        if case.spec.model != self.case.spec.model:
            raise ValueError("use_case keeps init/: the new case must be of the same model, with the same weights")
        self.case = case
        self.batches = write_token_batches(self.root / "batches.safetensors", case)

    def args(self, name: str, extra: list[str] | None = None, bucket_mb: float = 25.0, log: str | None = None,
             steps: int | None = None) -> list[str]:
        """pretrain argv for the run `name`: its save dir `save-NAME` and log `NAME.jsonl` (or `LOG.jsonl`: a
        resumed process logs to its own file); `steps`: fewer than the case's (the batches file holds them all)."""
        spec = self.case.spec if steps is None else self.case.spec.model_copy(update={"steps": steps})
        return pretrain_args(spec, self.init, self.batches, self.log(log or name), self.save_dir(name), bucket_mb, extra)

    def log(self, name: str) -> Path:
        return self.root / f"{name}.jsonl"

    def save_dir(self, name: str) -> Path:
        return self.root / f"save-{name}"

    def run(self, name: str, role: str, nproc: int = 1, extra: list[str] | None = None, bucket_mb: float = 25.0,
            args: list[str] | None = None) -> None:
        """Run pretrain (GateStop on a decline or crash, as every engine command), tensor parallel per
        options.tp (`with_tp`)."""
        argv, procs = with_tp(self.g, args if args is not None else self.args(name, extra, bucket_mb), nproc)
        self.g.run_engine(argv, self.box, role, procs)

    def series(self, name: str, first: int, last: int, role: str) -> dict[str, torch.Tensor]:
        """The log's steps first..last; a log that breaks the contract fails the gate, naming the problem."""
        try:
            return read_log(self.log(name), first, last)
        except LogError as e:
            raise GateStop("failed", f"{role}: the JSONL log breaks the training contract: {e}",
                           localization=Localization(what=f"{role}: {e}")) from None

    def export_hf(self, name: str, role: str) -> Path:
        out = self.root / f"hf-{name}"
        self.g.run_engine(["export-hf", "--checkpoint", str(self.save_dir(name)), "--out", str(out)], self.box, role)
        return out

    def state(self, name: str, role: str) -> tuple[dict[str, torch.Tensor], dict]:
        """`dump-state` of run `name`'s newest checkpoint."""
        out = self.root / f"state-{name}"
        self.g.run_engine(["dump-state", "--checkpoint", str(self.save_dir(name)), "--out", str(out)], self.box, role)
        try:
            return read_state(out)
        except (OSError, ValueError) as e:
            raise GateStop("failed", f"{role}: dump-state wrote no readable tensors.safetensors / metrics.json: {e}") from None


def valid_token_counts(case: Case) -> torch.Tensor:
    """labels != -100 per step of the case's global batches (float64, as logs are read)."""
    return (case.batches["labels"] != -100).flatten(1).sum(1).double()


def data_position(logged: torch.Tensor, case: Case, first: int) -> str | None:
    """None when logged valid-token counts (steps first..) match the case's batches; else which batch a step
    trained on instead (the counts are distinct per step in the gates' resume cases)."""
    want = valid_token_counts(case)
    for i, got in enumerate(logged.tolist()):
        t = first + i
        if got != float(want[t - 1]):
            match = [j + 1 for j, w in enumerate(want.tolist()) if w == got]
            which = f"batch {match[0]}'s count" if match else "no batch's count"
            return f"step {t} logged {int(got)} valid tokens, batch {t} has {int(want[t - 1])} ({which}): a batch was " \
                   "replayed or skipped"
    return None


def metrics_line(path: Path, limit: int = 2000) -> str:
    """The last log line as the engine wrote it (its own timing figures, shown beside the gate's)."""
    if not path.is_file():
        return ""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if not lines:
        return ""
    try:
        return json.dumps(json.loads(lines[-1]))[:limit]
    except json.JSONDecodeError:
        return lines[-1][:limit]


def logged_step_times(path: Path) -> list[float]:
    """The `step_time_s` of each log line that has one, as the engine claims it (shown beside the gate's walls)."""
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError, TypeError, ValueError, KeyError):
            out.append(float(json.loads(line)["step_time_s"]))
    return out


def with_tp(g: GateRun, args: list[str], nproc: int) -> tuple[list[str], int]:
    """pretrain's argv and process count for `nproc` data-parallel ranks: with options.tp > 1 each rank is tp
    processes and the engine gets `--tp`."""
    tp = g.options.tp
    return (args + ["--tp", str(tp)], nproc * tp) if tp > 1 else (args, nproc)


def run_killed_in_save(g: GateRun, box: PretrainBox, name: str, args: list[str], role: str,
                       poll_s: float = 0.001) -> dict:
    """Start `pretrain`, and SIGKILL its whole process tree the moment its save dir changes after the second
    logged step (a checkpoint being written). Returns what was seen: {"killed": bool, "at_step": the last
    logged step, "changed": the entries that appeared or changed, "rc": the exit code, "stderr_last": its
    stderr's last line}. The run may end before a save is seen (then killed is False)."""
    import os
    import signal
    import subprocess
    import time

    from gates.launch import engine_argv, engine_env
    from gates.sandbox import fingerprint, sandboxed_argv, verify_untouched, watched_paths

    save, log = box.save_dir(name), box.log(name)
    env = _engine_environ(engine_env(g.engine))
    seen: dict = {"killed": False, "at_step": 0, "changed": []}
    argv = engine_argv(g.engine, *with_tp(g, args, 1))
    full = sandboxed_argv(g, argv, box.root)  # the same sandbox as every engine command; killing it ends its tree
    before_fp = fingerprint(watched_paths())
    t0 = time.monotonic()
    with open(box.root / f"{name}.stderr", "wb") as err:
        p = subprocess.Popen(full, cwd=box.root, env=env, stdout=subprocess.DEVNULL,
                             stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        before: dict[str, float] | None = None
        try:
            while p.poll() is None:
                g.deadline.left()
                steps = _logged_steps(log)
                if steps >= 2:  # step 1's checkpoint is whole: a good one exists to resume from
                    now = _snapshot(save)
                    if before is None:
                        before = now
                    elif now != before:
                        os.killpg(p.pid, signal.SIGKILL)
                        seen |= {"killed": True, "at_step": steps,
                                 "changed": sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))[:8]}
                        break
                time.sleep(poll_s)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    g.report.commands.append(Command(role=role, argv=argv, cwd=str(box.root), env=engine_env(g.engine), rc=p.returncode,
                                     time_s=round(time.monotonic() - t0, 3), timed_out=False))
    verify_untouched(g, role, before_fp, box.root)
    seen |= {"rc": p.returncode, "stderr_last": last_line((box.root / f"{name}.stderr").read_text(errors="replace"))}
    return seen


def _logged_steps(log: Path) -> int:
    try:
        return sum(1 for ln in log.read_bytes().splitlines() if ln.strip().endswith(b"}"))
    except OSError:
        return 0


def _snapshot(d: Path) -> dict[str, float]:
    """Every entry under d (two levels) with its size and mtime: any write of a checkpoint changes it."""
    out: dict[str, float] = {}
    try:
        for e in d.iterdir():
            st = e.lstat()
            out[e.name] = st.st_mtime_ns + st.st_size
            if e.is_dir():
                for f in e.iterdir():
                    s2 = f.lstat()
                    out[f"{e.name}/{f.name}"] = s2.st_mtime_ns + s2.st_size
    except OSError:
        pass
    return out


def _engine_environ(env_set: dict[str, str]) -> dict[str, str]:
    """The environment run_process gives an engine: the gate's, scrubbed of import paths and credentials."""
    import os

    from gates.launch import _SCRUB, _SECRET_NAME

    return {k: v for k, v in os.environ.items() if not (k in _SCRUB or _SECRET_NAME.search(k))} | env_set
