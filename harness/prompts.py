"""Rendering the stage prompts (prompts/*.md.j2) with the spec, the round and the last gate report.

Prompts live only as templates; this module builds their context and renders them with
StrictUndefined, so a template that names a missing variable fails loudly instead of printing nothing.
"""

from __future__ import annotations

import ast
import json
import functools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from gates.model_config import preset
from harness.spec import ForgeSpec, GateCheck, StageSpec

WORKSPACE_ROOT = Path(__file__).resolve().parents[1]
PROMPTS_DIR = WORKSPACE_ROOT / "prompts"


def environment(prompts_dir: Path = PROMPTS_DIR) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(prompts_dir)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)


def stage_templates(prompts_dir: Path = PROMPTS_DIR) -> list[str]:
    """Template names (without .md.j2) a stage can use: every top-level template."""
    return sorted(p.name.removesuffix(".md.j2") for p in prompts_dir.glob("*.md.j2"))


def gate_command(spec: ForgeSpec, gate: GateCheck, engine_dir: Path) -> str:
    """The command an agent runs to check its own work with the gate runner (`agent-loop.sh gate`)."""
    o = gate.runner_options()
    parts = ["bash", str(WORKSPACE_ROOT / "agent-loop.sh"), "gate", gate.name, "--engine", str(engine_dir),
             "--reference", spec.reference, "--device", gate.device or spec.hardware.device,
             "--sandbox", "preferred"]  # the round sandbox already isolates it, and bwrap cannot nest inside it
    flags = {"case": "--case", "dtype": "--dtype", "policy": "--policy", "world_size": "--world-size",
             "steps": "--steps", "seq_length": "--seq-length", "long_train_steps": "--long-train-steps",
             "long_train_lr": "--long-train-lr",
             "mfu_threshold": "--mfu-threshold", "timeout_s": "--timeout"}
    for key, flag in flags.items():
        if key in o:
            parts += [flag, str(o[key])]
    if spec.hardware.tp > 1:  # as the loop's gates run it (harness/gating.py runner_options)
        parts += ["--tp", str(spec.hardware.tp)]
    return " ".join(shlex.quote(p) for p in parts)


@functools.cache
def exit_unsupported() -> int:
    """gates/probe.py's EXIT_UNSUPPORTED, read from its source: importing that module imports torch
    (seconds), and a prompt needs only this number."""
    tree = ast.parse((WORKSPACE_ROOT / "gates" / "probe.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXIT_UNSUPPORTED" for t in node.targets):
            return int(ast.literal_eval(node.value))
    from gates.probe import EXIT_UNSUPPORTED  # the constant moved: fall back to importing it

    return EXIT_UNSUPPORTED


@dataclass
class Feedback:
    """What the next round reads about the last one."""

    round: int
    verdict: str
    gates: list[dict[str, Any]] = field(default_factory=list)  # name, verdict, metrics, localization, report
    forbidden: list[str] = field(default_factory=list)
    agent_error: str | None = None
    carried: bool = False


@dataclass
class OpContext:
    """An op round's material: its contract and reference (the engine's op table), its leaderboard (gates/ops),
    the last candidate the per-op harness rejected, and the best step time on the gates' clock."""

    name: str
    metric: str
    minimize: bool
    best: float | None = None
    best_round: int | None = None
    contract: str = ""
    implementations: dict[str, dict] = field(default_factory=dict)  # name -> its declared space
    reference: str = ""  # the reference module's source
    reference_path: str = ""
    leaderboard: list[dict] = field(default_factory=list)  # the best rows first
    last_failure: dict | None = None


LEADERBOARD_ROWS = 8


def op_material(engine_dir: Path, op: str) -> dict[str, Any]:
    """OpContext's material for `op` from the engine in `engine_dir`: its op table (read through gates/ops, in a
    child process) and the leaderboard in the export; empty where the engine has no op table."""
    from gates.ops.harness import OpSpecError, describe, leaderboard_path

    try:
        spec = describe(engine_dir).table[op.partition(".")[0]]
    except (OpSpecError, KeyError):
        return {}
    out: dict[str, Any] = {"contract": spec.get("contract", ""),
                           "implementations": {n: i["space"] for n, i in spec["impls"].items()}}
    module = spec["impls"].get("reference", {}).get("module")
    if module:
        pkg = next((p.parent.name for p in (engine_dir / "src").glob("*/__main__.py")), "")
        path = engine_dir / "src" / pkg / "ops" / (module.replace(".", "/") + ".py")
        if path.is_file():
            out |= {"reference": path.read_text(), "reference_path": str(path.relative_to(engine_dir))}
    board = leaderboard_path(engine_dir, op)
    if board.is_file():
        entries = json.loads(board.read_text()).get("entries", [])
        out["leaderboard"] = entries[:LEADERBOARD_ROWS]
        failed = [e for e in entries if e["verdict"] != "passed"]
        out["last_failure"] = max(failed, key=lambda e: e["checked_at"]) if failed else None
    return out


def context(spec: ForgeSpec, stage: StageSpec, *, round_no: int, max_rounds: int, engine_dir: Path,
            feedback: Feedback | None = None, op: OpContext | None = None) -> dict[str, Any]:
    cfg = preset(spec.model.preset)
    model = cfg.model_dump() | {"dim_head": cfg.dim_head}
    gates = [g.model_dump() | {"command": gate_command(spec, g, engine_dir)} for g in stage.gates]
    return {
        "spec": spec, "stage": stage, "model": model, "gates": gates, "round": round_no, "max_rounds": max_rounds,
        "engine": {"dir": str(engine_dir), "package": spec.engine.package, "allowed_paths": spec.engine.allowed_paths},
        "feedback": feedback, "op": op, "exit_unsupported": exit_unsupported(),
    }


def render(spec: ForgeSpec, stage: StageSpec, *, prompts_dir: Path = PROMPTS_DIR, **kwargs: Any) -> str:
    """The prompt of one round. Raises jinja2.UndefinedError / TemplateNotFound on a broken template."""
    text = environment(prompts_dir).get_template(f"{stage.template}.md.j2").render(**context(spec, stage, **kwargs))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
