"""The gate report: one JSON file per gate run plus a short human summary.

A report says what was run (engine and reference commands, case hash and seed, policy), on what
(hardware, versions), what came out (verdict, the numbers compared per tensor, named parts such as
M5's `loss` and `mfu`), and, on failure, where engine and reference first diverge (`Localization`).

Verdicts: `passed`, `failed` (the engine's outputs are wrong or break the contract), `unsupported`
(the engine, the reference or the hardware cannot do this check: never a pass), `error` (the gate
could not finish: a timeout, a crash, a bad engine layout; `error_type` says which).
A report made of parts takes the worst part: failed > error > unsupported > passed.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from gates.policies import Diff

Verdict = Literal["passed", "failed", "unsupported", "error"]
SEVERITY: dict[str, int] = {"passed": 0, "unsupported": 1, "error": 2, "failed": 3}


def worst(verdicts: list[str]) -> Verdict:
    """The combined verdict of parts: failed > error > unsupported > passed (none: passed)."""
    return max(verdicts, key=SEVERITY.__getitem__, default="passed")  # type: ignore[return-value]


class Localization(BaseModel):
    """Where engine and reference first diverge, with both error figures of that tensor."""

    what: str = Field(description="one line a person or an agent reads first")
    layer: int | None = Field(None, description="decoder layer index (-1: the embedding output)")
    tensor: str | None = None
    step: int | None = Field(None, description="0-based optimizer step")
    rank: int | None = None
    rel: float | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    worst: str | None = Field(None, description="the tensor with the largest rel error, if not the first")


class Part(BaseModel):
    """A named sub-check with its own verdict (M4: vs_dp1 / vs_reference; M5: loss / mfu; M6: resume / hf_export)."""

    name: str
    verdict: Verdict
    message: str = ""
    numbers: dict[str, float | int | str | None] = {}


class Command(BaseModel):
    role: str = Field(description="engine | reference | export | bench ...")
    argv: list[str]
    cwd: str
    env: dict[str, str] = Field({}, description="variables the gate set for this command")
    rc: int | None = None
    time_s: float = 0.0
    timed_out: bool = False


class GateReport(BaseModel):
    gate: str
    verdict: Verdict
    error_type: str | None = Field(None, description="timeout | engine_crash | reference_crash | layout | case | policy | sandbox | internal")
    message: str = ""
    engine: str = ""
    engine_package: str = ""
    reference: str = ""
    commands: list[Command] = []
    hardware: dict[str, str | int | None] = {}
    versions: dict[str, str] = {}
    case: dict = Field({}, description="source, hash (sha256 of the case files), seed, shape summary")
    policy: dict = {}
    tensors: list[Diff] = Field([], description="every tensor compared")
    parts: list[Part] = []
    localization: Localization | None = None
    time_s: float = 0.0
    started_at: str = ""
    artifacts: dict[str, str] = Field({}, description="stderr / stdout tails, notes")
    engine_metrics: dict[str, dict] = Field({}, description="per engine probe run (role), its metrics.json as written: "
                                                            "what it ran, e.g. the op implementations")
    isolation: dict[str, str | list[str]] = Field(
        {}, description="how engine commands were isolated (gates/sandbox.py): {method: bwrap, guarantees} or "
        "{method: none, reason}; empty when no engine command ran")

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.gate}.json"
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    def summary_lines(self) -> list[str]:
        """A few plain lines: verdict, the failing spot, the worst numbers."""
        head = f"{self.gate}: {self.verdict.upper()}"
        if self.error_type:
            head += f" ({self.error_type})"
        head += f" in {self.time_s:.1f}s"
        if self.isolation.get("method") == "none":
            head += ", not sandboxed"
        lines = [head]
        if self.message:
            lines.append(f"  {self.message}")
        for p in self.parts:
            lines.append(f"  - {p.name}: {p.verdict}  {p.message}")
        if self.localization is not None:
            lines.append(f"  where: {self.localization.what}")
        if self.tensors:
            worst_t = max(self.tensors, key=lambda d: (not d.ok, d.rel if d.rel == d.rel else float("inf")))
            lines.append(f"  compared {len(self.tensors)} tensors; worst {worst_t.name}: {worst_t.figures()}")
        if self.policy:
            lines.append(f"  policy: {self.policy.get('describe', self.policy.get('name'))}")
        if self.isolation.get("method") == "none":
            lines.append(f"  not sandboxed: {self.isolation.get('reason', '')}")
        return lines


def print_summary(reports: list[GateReport]) -> None:
    """Short rich summary on stderr."""
    from rich.console import Console

    colors = {"passed": "green", "failed": "red", "unsupported": "yellow", "error": "magenta"}
    console = Console(stderr=True)
    for r in reports:
        lines = r.summary_lines()
        console.print(f"[bold {colors[r.verdict]}]{lines[0]}[/]", highlight=False)
        for line in lines[1:]:
            console.print(line, highlight=False, markup=False)


def environment(device: str) -> tuple[dict[str, str | int | None], dict[str, str]]:
    """(hardware, versions) of the machine the gate runs on."""
    import os

    import torch

    hardware: dict[str, str | int | None] = {
        "device": device, "machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "gpu": None, "gpu_count": 0,
    }
    if torch.cuda.is_available():
        hardware["gpu"] = torch.cuda.get_device_name(0)
        hardware["gpu_count"] = torch.cuda.device_count()
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()}
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    try:  # metadata only: importing transformers costs seconds
        from importlib.metadata import version

        versions["transformers"] = version("transformers")
    except Exception:  # pragma: no cover - a workspace dependency
        pass
    return hardware, versions


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def load_report(path: str | Path) -> GateReport:
    return GateReport.model_validate(json.loads(Path(path).read_text()))
