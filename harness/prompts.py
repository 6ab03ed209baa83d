"""Rendering the stage prompts (prompts/*.md.j2) with the spec, the round and the last gate report.

Prompts live only as templates; this module builds their context and renders them with
StrictUndefined, so a template that names a missing variable fails loudly instead of printing nothing.
"""

from __future__ import annotations

import ast
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
             "mfu_threshold": "--mfu-threshold", "timeout_s": "--timeout"}
    for key, flag in flags.items():
        if key in o:
            parts += [flag, str(o[key])]
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
    name: str
    metric: str
    minimize: bool
    timing_command: str | None  # None: the gates' clock (M5's speed part on pretrain)
    best: float | None = None
    best_round: int | None = None


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
