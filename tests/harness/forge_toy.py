"""A toy workspace for the loop tests: a git repo with gates/ and one export whose `forward` is broken,
plus a small but real fake gate (it runs the engine as a subprocess and compares with its own reference).

Used until/besides the real gates (gates/runner.py): the loop takes any GateFn.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gates.report import GateReport, Localization
from harness.agents import AgentTask
from harness.agents._env import agent_env
from harness.gating import GateOutcome
from harness.isolation import RoundBox, round_isolation, unsandboxed
from harness.spec import ForgeSpec, GateCheck, parse_spec

ENGINE_REL = "exports/toy_engine"
MODEL_PY = "src/toy_engine/model.py"
BROKEN = "def forward(xs):\n    return [x * 3 + 1 for x in xs]\n\n\ndef grad(xs):\n    return [2 for _ in xs]\n"
PARTIAL = "def forward(xs):\n    return [x * 2 + 2 for x in xs]\n\n\ndef grad(xs):\n    return [2 for _ in xs]\n"
FIXED = "def forward(xs):\n    return [x * 2 + 1 for x in xs]\n\n\ndef grad(xs):\n    return [2 for _ in xs]\n"
INPUTS = [0.5, -1.0, 3.0, 7.25]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def make_repo(root: Path, model_src: str = BROKEN) -> Path:
    """A workspace-shaped repo: gates/, specs/, exports/toy_engine/ (broken by default). Returns the engine dir."""
    eng = root / ENGINE_REL
    (eng / "src/toy_engine").mkdir(parents=True)
    (eng / "src/toy_engine/__init__.py").write_text("")
    (eng / MODEL_PY).write_text(model_src)
    (eng / "tuned.json").write_text('{"forward": {"block": 16}}\n')
    (eng / "manifest.json").write_text("{}\n")
    (eng / "README.md").write_text("toy engine\n")
    (root / "gates").mkdir()
    (root / "gates/__init__.py").write_text("# the workspace's gates\n")
    (root / ".gitignore").write_text("__pycache__/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "toy workspace")
    return eng


def _probe(engine_dir: Path, fn: str) -> list[float]:
    code = f"import json; from toy_engine.model import {fn}; print(json.dumps({fn}({INPUTS!r})))"
    r = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(engine_dir / "src"), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=60)
    if r.returncode:
        raise RuntimeError(r.stderr.strip()[-300:])
    return json.loads(r.stdout)


REFERENCE = {"m1_forward": ("forward", lambda x: x * 2 + 1), "m2_backward": ("grad", lambda x: 2.0)}


def fake_gate(gate: GateCheck, engine_dir: Path, spec: ForgeSpec, out_dir: Path) -> GateOutcome:
    """m1_forward / m2_backward on the toy engine: engine subprocess vs the gate's own reference."""
    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    fn, ref = REFERENCE.get(gate.name, ("forward", lambda x: x * 2 + 1))
    metrics: dict[str, Any] = {}
    loc = None
    try:
        got = _probe(engine_dir, fn)
        want = [ref(x) for x in INPUTS]
        errs = [abs(a - b) for a, b in zip(got, want)]
        metrics = {"max_abs_err": max(errs), "n": len(errs)}
        bad = [i for i, e in enumerate(errs) if e > 0]
        verdict = "failed" if bad else "passed"
        if bad:
            i = bad[0]
            loc = f"{fn}: element {i} (x={INPUTS[i]}): engine {got[i]}, reference {want[i]}"
    except Exception as e:  # noqa: BLE001
        verdict, loc = "error", str(e)
    report = GateReport(gate=gate.name, verdict=verdict, localization=Localization(what=loc) if loc else None,
                        time_s=time.monotonic() - t0)
    path = out_dir / f"{gate.name}.json"
    path.write_text(report.model_dump_json() + "\n")
    return GateOutcome(gate.name, verdict, metrics, loc, report.time_s, path)


def toy_spec(engine_dir: Path, *, backend: str = "replay", options: dict | None = None, rounds: int = 3,
             stages: tuple[str, ...] = ("m1", "m2"), **top: Any) -> ForgeSpec:
    gates = {"m1": "m1_forward", "m2": "m2_backward"}
    data: dict[str, Any] = {
        "name": "toy", "model": {"preset": "tiny"},
        "engine": {"path": str(engine_dir), "package": "toy_engine", "allowed_paths": ["src/**", "tests/**", "README.md"]},
        "budgets": {"rounds_per_stage": rounds},
        "agent": {"backend": backend, "options": options or {}, "timeout_s": 60},
        "stages": [{"name": s, "gates": [{"name": gates[s]}]} for s in stages],
    }
    for k, v in top.items():
        data[k] = v if not isinstance(v, dict) else {**data.get(k, {}), **v}
    return parse_spec(data)


def write_spec_file(path: Path) -> Path:
    path.write_text('# toy spec file: its bytes are hashed into the run state\nname = "toy"\n')
    return path


def patch_between(engine_dir: Path, new_model_src: str) -> str:
    """A git patch (relative to the repo root) that turns the committed model.py into `new_model_src`."""
    root = Path(git(engine_dir, "rev-parse", "--show-toplevel"))
    f = engine_dir / MODEL_PY
    old = f.read_text()
    f.write_text(new_model_src)
    try:
        return git(root, "diff", "--", str(f)) + "\n"
    finally:
        f.write_text(old)


def make_task(tmp_path: Path, wt: Path, *, sandboxed: bool = True, env: dict[str, str] | None = None,
              share: tuple[Path, ...] = (), **kw: Any) -> AgentTask:
    """A round's task on the repository `wt` (its own worktree), in the round sandbox unless `sandboxed=False`."""
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    box = (RoundBox(round_isolation("required"), wt, wt / ".git", None, out, shown=share) if sandboxed
           else unsandboxed(wt, out))
    fields: dict[str, Any] = dict(stage="m1", round=1, prompt="fix forward", prompt_file=tmp_path / "p.md", worktree=wt,
                                  engine_dir=wt / ENGINE_REL, env=env or agent_env(["PATH", "HOME"]), timeout_s=60,
                                  log_dir=tmp_path / "logs", box=box)
    return AgentTask(**(fields | kw))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def write_toml_spec(path: Path, spec: ForgeSpec) -> Path:
    """`spec` as a TOML file the CLI reads (`forge --spec`)."""
    data = spec.model_dump(mode="json", exclude_none=True)
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, (dict, list))]
    for table in ("model", "hardware", "engine", "budgets", "agent", "loop"):
        lines += [f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in data[table].items()]
    for st in data["stages"]:
        lines += ["[[stages]]"] + [f"{k} = {_toml_value(v)}" for k, v in st.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
