"""`demo`: the main job on a fresh machine, offline, on a CPU.

1. copy exports/train_engine_0.5B into a scratch git repository (runs/demo-<time>/ by default);
2. break it on purpose (a MiniCPM-specific bug: the residual scale without its 1/sqrt(L)), commit that;
3. forge it through the stage-1 gates of specs/tiny-cpu.toml with the `replay` backend. The recording
   is made here, from the break: round 1 replays a plausible but wrong fix (scale_depth / L), which the
   M1 gate fails with a localization that goes into round 2's prompt; round 2 replays the right fix,
   which passes and is committed (with manifest.json) and lands on the scratch repo's branch; the
   later stages need no edit and pass on the fixed engine;
4. train the forged engine on the default corpus with the tiny preset (`train` verb), loss falling;
5. `inspect` it (report + loss/MFU plot) and print a summary.

It prints about 40 lines (one per round, the first and last training steps, the summary); the detail is in files
under the scratch folder, each named as it goes: forge.log (the loop's own output), state/rounds/ (prompts,
patches, gate reports), train/console.log, inspect/ (report.md, loss_mfu.png).

The recorded patches are scripted, and the summary says so: the demo shows the loop, the gates, the
feedback and the commits working, not a model's coding.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console

from harness import launcher
from harness.gating import round_label, stage_labels
from harness.inspection import key_numbers
from harness.ledger import Ledger
from harness.prompts import WORKSPACE_ROOT
from harness.scratch import git as _git, scratch_copy
from harness.secrets import redact

SOURCE_ENGINE = WORKSPACE_ROOT / "exports" / "train_engine_0.5B"
SPEC = WORKSPACE_ROOT / "specs" / "tiny-cpu.toml"


@dataclass(frozen=True)
class Sabotage:
    what: str
    pattern: str       # regex, first match in the engine's model code
    broken: str
    wrong_fix: str


SABOTAGES = (
    Sabotage("residual branches scaled by scale_depth instead of scale_depth / sqrt(L)",
             r"\bcfg\.residual_scale\b", "cfg.scale_depth", "cfg.scale_depth / cfg.num_layers"),
    Sabotage("embedding output not multiplied by scale_emb",
             r"\s*\*\s*cfg\.scale_emb\b", "", " * cfg.scale_depth"),
)


@dataclass
class DemoResult:
    scratch: Path
    engine: Path
    sabotage: str = ""
    file: str = ""
    forge_status: str = ""
    rounds: list[dict] = field(default_factory=list)
    landed_commit: str = ""
    train_first: float | None = None
    train_last: float | None = None
    train_steps: int = 0
    report: Path | None = None
    plot: Path | None = None
    stages: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def prepare(scratch: Path, source: Path = SOURCE_ENGINE) -> Path:
    """A git repository whose root is a copy of the export."""
    return scratch_copy(source, scratch, f"pristine copy of {source.relative_to(WORKSPACE_ROOT)}")


def break_engine(eng: Path) -> tuple[Sabotage, Path]:
    """Apply the first sabotage whose pattern the engine's source has; commit the broken engine."""
    files = sorted((eng / "src").rglob("*.py"), key=lambda p: (p.name != "model.py", str(p)))
    for sab in SABOTAGES:
        for f in files:
            text = f.read_text()
            if re.search(sab.pattern, text):
                f.write_text(re.sub(sab.pattern, sab.broken, text, count=1))
                _git(eng, "commit", "-q", "-am", f"demo: deliberately broken ({sab.what})")
                return sab, f
    raise RuntimeError("demo: found nothing to break in the engine's source (its model code changed shape)")


def record(eng: Path, sab: Sabotage, target: Path, recording: Path) -> None:
    """The replay recording: m1 round 1 = a wrong fix, round 2 = the right one (patches vs the broken commit)."""
    recording.mkdir(parents=True, exist_ok=True)
    broken = target.read_text()
    pristine = _git(eng, "show", f"HEAD~1:{target.relative_to(eng).as_posix()}") + "\n"
    wrong = re.sub(sab.pattern, sab.wrong_fix, pristine, count=1)
    for name, content in (("m1-r1.patch", wrong), ("m1-r2.patch", pristine)):
        target.write_text(content)
        (recording / name).write_text(_git(eng, "diff") + "\n")
    target.write_text(broken)


def train(eng: Path, out: Path, steps: int, console: Console) -> list[dict]:
    """Train the forged engine with the `train` verb (torchrun, 1 process, CPU, tiny, default corpus)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train_log.jsonl"
    cmd = [sys.executable, "-m", "harness", "train", "--engine", str(eng), "--console-log", str(out / "console.log"), "--",
           "--model", "tiny", "--num-steps", str(steps), "--seq-length", "64", "--global-batch-size", "8",
           "--micro-batch-size", "8", "--lr", "3e-3", "--warmup-steps", "5", "--device", "cpu",
           "--log-file", str(log), "--save-dir", str(out / "ckpt"), "--summary-json", str(out / "summary.json")]
    env = {"PYTHONPATH": str(WORKSPACE_ROOT), "PATH": "/usr/local/bin:/usr/bin:/bin",
           "HOME": str(Path.home()), "FORGE_ENGINE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = launcher.run(cmd, cwd=out, env=env)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("[STEP")]
    for line in lines[:2] + (["..."] if len(lines) > 4 else []) + lines[-2:]:
        console.print(f"  {line}", markup=False, highlight=False)
    console.print(f"  whole output: {out / 'console.log'}", highlight=False)
    if r.returncode != 0:
        raise RuntimeError(f"training exited {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


def run(scratch: Path, *, steps: int = 40, only: list[str] | None = None, console: Console | None = None) -> DemoResult:
    from harness.inspection import collect, write
    from harness.loop import ForgeLoop
    from harness.spec import load_spec, with_overrides

    console = console or Console(stderr=True)
    scratch = scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    eng = prepare(scratch)
    res = DemoResult(scratch=scratch, engine=eng)
    sab, target = break_engine(eng)
    res.sabotage, res.file = sab.what, str(target.relative_to(eng))
    console.rule("1. scratch copy, broken on purpose")
    console.print(f"{eng}\nbroke {res.file}: {sab.what}")
    record(eng, sab, target, scratch / "recording")

    console.rule("2. forge through the stage-1 gates (specs/tiny-cpu.toml, replay backend)")
    t = time.monotonic()
    spec = with_overrides(load_spec(SPEC), engine_path=str(eng), backend="replay",
                          options={"recording": str(scratch / "recording")})
    ledger = scratch / "state" / "ledger.jsonl"
    console.print(f"the loop's own output: {scratch / 'forge.log'}; prompts, patches and gate reports: "
                  f"{scratch / 'state' / 'rounds'}", highlight=False)
    with (scratch / "forge.log").open("w") as fh, RoundTicker(ledger, console):
        loop_console = Console(file=RedactedFile(fh), width=120, highlight=False)
        outcome = ForgeLoop(spec, SPEC, engine=eng, state_dir=scratch / "state", console=loop_console).run(only=only)
    res.seconds["forge"] = time.monotonic() - t
    res.forge_status = outcome.status
    res.rounds = [r.model_dump() for r in Ledger(ledger).rounds()]
    res.stages = stage_labels(outcome.stages, ledger)
    res.landed_commit = _git(eng, "rev-parse", "HEAD")
    if not outcome.ok:
        res.problems.append(f"forge ended {outcome.status}: {outcome.message}")
    m1 = [r for r in res.rounds if r["stage"] == "m1"]
    if not (len(m1) >= 2 and m1[0]["verdict"] == "failed" and m1[-1]["verdict"] == "passed"):
        res.problems.append("expected m1 to fail in round 1 and pass later")
    if _git(eng, "rev-parse", "HEAD") != outcome.tip:
        res.problems.append("the forged commit did not land on the scratch repo's branch")

    if outcome.ok:
        console.rule("3. train the forged engine (tiny preset, default corpus)")
        t = time.monotonic()
        try:
            recs = train(eng, scratch / "train", steps, console)
            res.train_steps = len(recs)
            k = max(1, min(5, len(recs) // 4))
            res.train_first = sum(r["loss"] for r in recs[:k]) / k
            res.train_last = sum(r["loss"] for r in recs[-k:]) / k
            if not res.train_last < res.train_first:
                res.problems.append(f"loss did not fall ({res.train_first:.3f} -> {res.train_last:.3f})")
        except RuntimeError as e:
            res.problems.append(str(e))
        res.seconds["train"] = time.monotonic() - t

    console.rule("4. inspect")
    logs = [scratch / "train" / "train_log.jsonl"] if (scratch / "train" / "train_log.jsonl").is_file() else []
    ins = collect(eng, ledgers=[ledger], logs=logs)
    paths = write(ins, scratch / "inspect")
    res.report, res.plot = paths["md"], paths["png"]
    gates = ", ".join(f"{g['gate']} {g['verdict']}" for g in ins.gates) or "none"
    console.print(f"manifest.json records: {gates}", highlight=False)
    console.print(f"hardware: {', '.join(sorted({g['hardware'] for g in ins.gates})) or '-'}", highlight=False)
    res.seconds["total"] = time.monotonic() - t0
    return res


def summary(res: DemoResult, console: Console) -> None:
    console.rule("demo summary")
    console.print(f"scratch repo: {res.engine}  (HEAD {res.landed_commit[:10]})", highlight=False)
    console.print(f"deliberate break: {res.sabotage} in {res.file}; the replay backend replayed patches the demo "
                  "scripted (round 1 a wrong fix, round 2 the right one)", highlight=False)
    console.print("stages: " + ", ".join(f"{k} {v}" for k, v in res.stages.items()), highlight=False)
    if res.train_first is not None:
        console.print(f"training: {res.train_steps} steps, mean loss of the first steps {res.train_first:.3f} -> "
                      f"last steps {res.train_last:.3f}")
    console.print(f"inspect report: {res.report}\nplot: {res.plot}", highlight=False)
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items()))
    if res.ok:
        console.print("[bold green]demo passed[/]")
    for p in res.problems:
        console.print(f"[bold red]demo problem:[/] {p}")


class RedactedFile:
    """A log file every line of which goes through the one redaction filter (nothing a run stores holds a key)."""

    def __init__(self, fh: TextIO) -> None:
        self.fh = fh

    def write(self, text: str) -> int:
        return self.fh.write(redact(text))

    def flush(self) -> None:
        self.fh.flush()


class RoundTicker:
    """One line per round as its ledger line lands (the loop's own output goes to a file): stage, round, verdict,
    and for a failing round the gate that failed and where."""

    def __init__(self, ledger: Path, console: Console, every_s: float = 1.0) -> None:
        self.ledger, self.console, self.every_s = ledger, console, every_s
        self.seen = 0
        self._lock = threading.Lock()  # the watcher thread and __exit__ both emit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> RoundTicker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._emit()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self._emit()

    def _emit(self) -> None:
        with self._lock:
            self._emit_new()

    def _emit_new(self) -> None:
        rounds = Ledger(self.ledger).rounds() if self.ledger.is_file() else []
        for r in rounds[self.seen:]:
            line = f"  {r.key} round {r.round}: {round_label(r.verdict, r.gates)}"
            bad = next((g for g in r.gates if g.verdict not in ("passed", "unsupported")), None)
            if bad is not None:
                nums = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in key_numbers(bad.metrics, 3))
                line += f" ({bad.name} {bad.verdict}: {nums})"
            self.console.print(line + f" [{r.wall_s:.0f} s]", highlight=False, markup=False)
        self.seen = len(rounds)
