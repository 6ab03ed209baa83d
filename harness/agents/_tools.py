"""The built-in tool loop's tools (anthropic and openai backends): read, write, list, run.

Every path is relative to the round's worktree and must stay inside it; `run_command` runs in the
worktree, in the round's sandbox, with the agent's scrubbed environment and a timeout. Results are plain
text, truncated and redacted (they go back to the service and into the transcript).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.agents._proc import run_process
from harness.agents.base import AgentTask
from harness.secrets import redact

MAX_OUTPUT = 20_000

TOOLS: list[dict[str, Any]] = [
    {"name": "read_file", "description": "Read a text file of the worktree.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "relative to the worktree"}},
                    "required": ["path"]}},
    {"name": "write_file", "description": "Create or overwrite a text file of the worktree.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                    "required": ["path", "content"]}},
    {"name": "list_dir", "description": "List a directory of the worktree (one entry a line, / after directories).",
     "parameters": {"type": "object", "properties": {"path": {"type": "string", "default": "."}}, "required": []}},
    {"name": "run_command", "description": "Run a shell command in the worktree; returns exit code, stdout, stderr.",
     "parameters": {"type": "object", "properties": {"command": {"type": "string"},
                                                     "timeout_s": {"type": "number", "default": 600}},
                    "required": ["command"]}},
]


class ToolError(Exception):
    """A tool call the harness refuses (a path outside the worktree, a missing argument)."""


def _inside(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if p != root.resolve() and root.resolve() not in p.parents:
        raise ToolError(f"path {rel!r} is outside the worktree")
    return p


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_OUTPUT else text[:MAX_OUTPUT // 2] + "\n...[truncated]...\n" + text[-MAX_OUTPUT // 2:]


def execute(name: str, args: dict[str, Any], task: AgentTask, *, max_timeout_s: float) -> str:
    """Run one tool call; errors come back as text for the model to read, never as exceptions."""
    return redact(_execute(name, args, task, max_timeout_s))


def _execute(name: str, args: dict[str, Any], task: AgentTask, max_timeout_s: float) -> str:
    root = task.worktree
    try:
        if name == "read_file":
            return _truncate(_inside(root, args["path"]).read_text(errors="replace"))
        if name == "write_file":
            p = _inside(root, args["path"])
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(args["content"])
            return f"wrote {len(args['content'])} characters to {args['path']}"
        if name == "list_dir":
            p = _inside(root, args.get("path") or ".")
            return "\n".join(sorted(c.name + ("/" if c.is_dir() else "") for c in p.iterdir() if c.name != ".git"))
        if name == "run_command":
            timeout = min(float(args.get("timeout_s") or max_timeout_s), max_timeout_s)
            argv, env = task.box.wrap(["bash", "-c", args["command"]], task.env)
            logs = task.log_dir / "commands"
            n = len(list(logs.glob("*.stdout"))) + 1 if logs.is_dir() else 1
            r = run_process(argv, cwd=root, env=env, timeout_s=timeout, log_dir=logs, name=f"{n:03d}",
                            on_spawn=task.on_spawn)
            if r.timed_out:
                return f"timeout after {timeout:.0f} s (the command's processes were killed)"
            return _truncate(f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
        return f"error: unknown tool {name!r}"
    except KeyError as e:
        return f"error: missing argument {e}"
    except (ToolError, OSError) as e:
        return f"error: {e}"


def parse_args(raw: str | dict | None) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        out = json.loads(raw or "{}")
    except json.JSONDecodeError:
        return {}
    return out if isinstance(out, dict) else {}
