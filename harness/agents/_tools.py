"""The built-in tool loop's tools (anthropic and openai backends): read, write, list, run.

Every path is relative to the round's worktree and must stay inside it; `run_command` runs in the
worktree with the agent's scrubbed environment and a timeout. Results are plain text, truncated.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from harness.agents._proc import kill_group

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


def execute(name: str, args: dict[str, Any], *, root: Path, env: dict[str, str], max_timeout_s: float) -> str:
    """Run one tool call; errors come back as text for the model to read, never as exceptions."""
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
            proc = subprocess.Popen(["bash", "-c", args["command"]], cwd=root, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                    start_new_session=True)
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                proc.communicate()
                return f"timeout after {timeout:.0f} s (the command's process group was killed)"
            kill_group(proc.pid)
            return _truncate(f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}")
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
